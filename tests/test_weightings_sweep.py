"""The weighting sweep recipe (recipes/weightings/): single-task baselines, a sweep over
weightings, and the compare table's Delta_m, checked against the formula computed here
from each run's last evaluation (tiny sizes)."""

from __future__ import annotations

import csv
import json

from mtlkit.cli import main
from mtlkit.plugin_manager import get_registry
from mtlkit.rundir import read_log

TINY = {"model.backbone.params.width": 0.0625, "data.params.height": 32, "data.params.width": 32,
        "data.params.num_train": 4, "data.params.num_val": 2, "training.epochs": 1, "training.batch_size": 2,
        "training.max_steps_per_epoch": 2, "training.device": "cpu"}


def sets(overrides):
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}"]
    return out


def last_metrics(run):
    return [r for r in read_log(run) if r.get("type") == "eval"][-1]["metrics"]


def delta_m(mtl, stl):
    """(1/M) sum over the baseline's metrics of (-1)^h (Mm - Ms) / Ms * 100 (reference formula)."""
    terms = []
    for task, metrics in stl.items():
        higher = get_registry().get("task", task).build(
            {"num_classes": 7} if task == "segmentation" else {}, name=task).metrics().higher_is_better
        for name, base in metrics.items():
            if name == "loss":
                continue
            sign = -1.0 if higher[name] else 1.0
            terms.append(sign * (mtl[task][name] - base) / base * 100)
    return sum(terms) / len(terms)


def test_sweep_of_weightings_gives_a_delta_m_table(tmp_path, capsys):
    base = tmp_path / "single"
    assert main(["run", "weightings/scenes_single", *sets(TINY), "--quiet", "--run-dir", str(base)]) == 0
    runs = tmp_path / "runs"
    rc = main(["sweep", "weightings/scenes", *sets(TINY), "--grid", "weighting.name=equal,upgrad",
               "--baseline", str(base), "--last", "1", "--quiet", "--runs-dir", str(runs)])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader((runs / "sweep" / "compare.csv").open()))
    assert [r["weighting"] for r in rows] == ["equal", "upgrad"]
    stl = last_metrics(base)
    for row in rows:
        run = runs / "sweep" / f"weightings_scenes-{row['weighting']}"
        expected = delta_m(last_metrics(run), stl)
        assert abs(float(row["delta_m%"]) - expected) <= 0.0051  # the table prints 2 decimals


def test_sweep_refuses_a_missing_baseline_before_training(tmp_path, capsys):
    rc = main(["sweep", "weightings/scenes", *sets(TINY), "--grid", "weighting.name=equal",
               "--baseline", str(tmp_path / "nowhere"), "--quiet", "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2 and "not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
