"""A Delta_m baseline read from an earlier run's results.json (``baselines.TASK = 'RUN_DIR'``)
that is not a results table is one line naming the file and what is wrong, the same line
from ``validate`` and ``run``, and ``run`` makes no run folder."""

from __future__ import annotations

import json

import pytest

from mtlkit.cli import main

TINY = ["--set", "model.backbone.params.widths=[4, 8]", "--set", "data.params.size=8",
        "--set", "data.params.num_train=16", "--set", "data.params.num_val=8",
        "--set", "training.batch_size=8", "--set", "training.epochs=1", "--set", "training.device='cpu'"]

GOOD = {"shape": {"accuracy": 62.5, "loss": 1.28}, "colour": {"accuracy": 25.0}}

CASES = {  # name: (results.json bytes, what the one line must say)
    "not_utf8": (b"\xff\xfe", "not UTF-8"),
    "not_json": (b'{"final": {"shape": ', "not JSON"),
    "not_an_object": (b"[1, 2]", "a JSON object"),
    "final_a_string": (b'{"final": "shape"}', "field 'final' must be a table {task: {metric: number}}"),
    "task_not_a_table": (b'{"final": {"shape": 5}}', "field 'final.shape' must map metric names to numbers"),
    "metric_a_string": (json.dumps({"final": {"shape": {"accuracy": "high"}}}).encode(), "field 'final.shape' must"),
    "metric_nan": (json.dumps({"final": {"shape": {"accuracy": float("nan")}}}).encode(), "not a finite number"),
    "metric_null": (json.dumps({"final": {"shape": {"accuracy": None}}}).encode(), "not a finite number"),
    "metric_bool": (json.dumps({"final": {"shape": {"accuracy": True}}}).encode(), "field 'final.shape' must"),
    "task_missing": (json.dumps({"final": {"colour": {"accuracy": 1.0}}}).encode(), "no results for task 'shape'"),
    "no_evaluation": (json.dumps({"final": None}).encode(), "no results for task 'shape'"),
    "last_n_bad": (json.dumps({"final": GOOD, "last_n_mean": {"n": 2, "metrics": [1]}}).encode(),
                   "'last_n_mean.metrics'"),
}


def one_error(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_baseline_results_json_is_one_line_from_validate_and_run(case, tmp_path, capsys):
    data, says = CASES[case]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_bytes(data)
    args = [*TINY, "--set", f"baselines.shape='{earlier}'"]
    err = one_error(["validate", "shapes", *args], capsys)
    assert str(earlier / "results.json") in err and "[baselines] shape" in err and says in err, err
    run = tmp_path / "run"
    assert one_error(["run", "shapes", *args, "--quiet", "--run-dir", str(run)], capsys) == err
    assert not run.exists()
    assert (earlier / "results.json").read_bytes() == data


def test_a_good_results_table_is_read_as_written(tmp_path):
    from mtlkit.earlier_runs import resolve_baselines
    from mtlkit.rundir import read_results

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"epochs_done": 1, "final": GOOD, "best": None, "history": []}))
    assert read_results(path)["final"] == GOOD
    # the mean of the last evaluations is the baseline when recorded
    path.write_text(json.dumps({"final": GOOD, "last_n_mean": {"n": 2, "metrics": {"shape": {"accuracy": 60.0}}}}))
    assert resolve_baselines({"shape": str(tmp_path), "colour": {"accuracy": 1.0}}, None) == {
        "shape": {"accuracy": 60.0}, "colour": {"accuracy": 1.0}}
