"""Bad input in run folders and data files: a damaged recipe copy, compare and plot on runs
without a checkpoint or evaluation, a torn log line, and Decathlon annotations with ids that
are not integers or files outside the data root. One line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_bad_input import GOOD, one_line_error, snapshot, write  # noqa: E402

from mtlkit.cli import main


# -- a damaged run folder ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    (base / "shapes_tiny.toml").write_text(GOOD.replace("epochs = 1", "epochs = 2"))
    assert main(["run", str(base / "shapes_tiny.toml"), "--quiet", "--runs-dir", str(base / "runs")]) == 0
    return next((base / "runs" / "shapes_tiny").iterdir())


def copy_run(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_binary_recipe_in_a_run_folder(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "recipe.toml").write_bytes(b"\xff\xfe\x00garbage\x81")
    one_line_error(capsys, ["run", "--resume", str(run), "--quiet"], "recipe.toml", "UTF-8", folder=tmp_path)
    one_line_error(capsys, ["validate", str(run / "recipe.toml")], "recipe.toml", "UTF-8")


def test_compare_and_plot_skip_a_run_without_a_checkpoint(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.toml").write_text((finished / "recipe.toml").read_text())
    (half / "log.jsonl").write_text('{"type": "step", "global_step": 1}\n')
    (tmp_path / "compare.md").write_text("a file among the runs")
    before = snapshot(tmp_path)
    rc = main(["compare", str(finished), str(half), str(tmp_path / "compare.md")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: skipped") for n in notes)
    assert str(half) in notes[0] and "no evaluation" in notes[0]
    assert "shapes_tiny/" + finished.name in out
    one_line_error(capsys, ["compare", str(half)], str(half), "no evaluation")
    one_line_error(capsys, ["compare", str(half), str(tmp_path / "compare.md")], "none of the 2 run folders")
    one_line_error(capsys, ["plot", str(half)], str(half), "no checkpoint")
    assert snapshot(tmp_path) == before


def test_compare_counts_what_it_averages_and_writes_only_when_asked(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(finished), "--last", "10"]) == 0
    out = capsys.readouterr().out
    assert "mean of the last 2 evaluations" in out and "last 10" not in out
    assert list(tmp_path.iterdir()) == []  # nothing in the current folder unasked
    assert main(["compare", str(finished), "--csv", "t.csv", "--markdown", "t.md"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]
    header, row = (tmp_path / "t.csv").read_text().splitlines()[:2]
    assert row.split(",")[header.split(",").index("evals")] == "2"
    assert row.split(",")[0] == "shapes_tiny/" + finished.name
    one_line_error(capsys, ["compare", str(finished), "--csv", str(tmp_path / "no" / "such" / "t.csv")],
                   "t.csv", "cannot write")


def test_torn_last_log_line(finished, tmp_path, capsys):
    from mtlkit.errors import DataError
    from mtlkit.rundir import read_log

    run = copy_run(finished, tmp_path / "run")
    log = run / "log.jsonl"
    good = read_log(run)
    log.write_text(log.read_text() + '{"type": "eval", "epo')
    assert read_log(run) == good
    assert main(["plot", str(run)]) == 0, capsys.readouterr().err
    assert main(["compare", str(run)]) == 0
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1] + ["{torn"] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"log\.jsonl:2"):
        read_log(run)


# -- Decathlon annotations ---------------------------------------------------------------------
def annotation(tmp_path: Path, **changes) -> Path:
    root = tmp_path / "dec"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    raw = {"images": [{"id": 1, "file_name": "data/dtd/train/1.jpg"}, {"id": 2, "file_name": "data/dtd/train/2.jpg"}],
           "annotations": [{"image_id": 1, "category_id": 50000001}, {"image_id": 2, "category_id": 50000002}],
           "categories": [{"id": 50000001 + i, "name": f"c{i}"} for i in range(47)]}
    for path, value in changes.items():
        section, index, key = path.split(".")
        raw[section][int(index)][key] = value
    (root / "annotations" / "dtd_train.json").write_text(json.dumps(raw))  # inf/nan as Infinity/NaN
    return root


@pytest.mark.parametrize("change,field", [
    ({"categories.0.id": float("inf")}, "categories[0].id"),
    ({"categories.3.id": float("nan")}, "categories[3].id"),
    ({"categories.0.id": -1}, "categories[0].id"),
    ({"images.1.id": float("inf")}, "images[1].id"),
    ({"images.0.id": 1.5}, "images[0].id"),
    ({"annotations.1.category_id": float("-inf")}, "annotations[1].category_id"),
    ({"annotations.0.image_id": True}, "annotations[0].image_id"),
])
def test_decathlon_ids_that_are_not_integers(tmp_path, change, field):
    from mtlkit.errors import DataError
    from mtlkit.plugins.decathlon.dataset import read_official_index

    root = annotation(tmp_path, **change)
    with pytest.raises(DataError) as info:
        read_official_index(root, "dtd", "train", check_files=False)
    assert "dtd_train.json" in str(info.value) and field in str(info.value)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.jpg", "data/../../outside.jpg"])
def test_decathlon_file_name_outside_the_root(tmp_path, name):
    from mtlkit.errors import DataError
    from mtlkit.plugins.decathlon.dataset import read_official_index

    root = annotation(tmp_path, **{"images.1.file_name": name})
    with pytest.raises(DataError) as info:
        read_official_index(root, "dtd", "train", check_files=False)
    assert "dtd_train.json" in str(info.value) and name in str(info.value) and "outside" in str(info.value)


def test_decathlon_infinite_id_through_the_cli(tmp_path, capsys):
    root = annotation(tmp_path, **{"categories.0.id": float("inf")})
    recipe = GOOD.replace('name = "synthetic_classification"\nparams = { size = 8, num_train = 8, num_val = 4 }',
                          f'name = "decathlon"\nparams = {{ root = "{root}", domain = "dtd" }}')
    recipe = recipe.replace('num_classes = 4, target = "shape"', "num_classes = 47")
    one_line_error(capsys, ["run", write(tmp_path, recipe), "--quiet", "--runs-dir", str(tmp_path / "runs")],
                   "dtd_train.json", "categories[0].id", folder=tmp_path)
