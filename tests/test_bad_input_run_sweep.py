"""Bad input to ``mtlkit run``, ``validate`` and ``sweep``: each is refused with one line that
names the field or argument, exit code 2, before anything trains or is written (a sweep
checks every combination first: a bad one found after others trained would leave a
partial sweep folder a rerun cannot write into)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlkit.cli import main
from mtlkit.cli.sweep import _tag

# quickstart at a size whose checks take a moment (and that trains in seconds)
TINY = ["--set", "training.epochs=1", "--set", "data.params.num_train=4", "--set", "data.params.num_val=2",
        "--set", "data.params.height=32", "--set", "training.batch_size=2", "--set", "training.device='cpu'",
        "--set", "model.backbone.params.width=0.0625"]
SHAPES = ["--set", "model.backbone.params.widths=[4, 8]", "--set", "data.params.size=8",
          "--set", "data.params.num_train=8", "--set", "data.params.num_val=4", "--set", "training.batch_size=4",
          "--set", "training.epochs=1", "--set", "training.device='cpu'"]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line(capsys, args: list[str], *needles: str) -> str:
    rc = main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# 1. a run name is one folder name: validate, run and sweep all refuse a path
@pytest.mark.parametrize("name", ["../../../ESCAPED", "a/b", ".."])
def test_recipe_name_must_be_one_folder_name(work, capsys, name):
    one_line(capsys, ["validate", "quickstart", "--set", f'name="{name}"'], "--set name=", "name:",
             "no path separators")
    one_line(capsys, ["run", "quickstart", "--set", f'name="{name}"', "--quiet"], "name:", "no path separators")
    runs = work / "swx" / "d1" / "d2" / "d3"
    one_line(capsys, ["sweep", "quickstart", "--grid", f'name="{name}"', *TINY, "--runs-dir", str(runs)],
             "--grid name=", "name:", "no path separators")
    assert files(work) == []


def test_swept_values_cannot_make_nested_run_folders():
    for value in ('"../a/b"', "/x/y", "..\\y", "a/../.."):
        tag = _tag([f"model.init_from.path={value}"])
        assert tag and not any(bad in tag for bad in ("/", "\\", "..")), tag
    assert _tag(["weighting.name=equal", "optimizer.lr=1e-3"]) == "equal-1e-3"


# 2. a key swept twice
@pytest.mark.parametrize("grid", [["weighting.name=equal", "weighting.name=dwa"],
                                  ["weighting.name=equal", "weighting=dwa"]])
def test_sweep_refuses_a_key_given_twice(work, capsys, grid):
    args = sum((["--grid", g] for g in grid), [])
    one_line(capsys, ["sweep", "quickstart", *args, *TINY, "--runs-dir", "runs"], "--grid", "weighting", "once")
    assert files(work) == []


def test_sweep_refuses_a_grid_key_that_overwrites_a_set(work, capsys):
    one_line(capsys, ["sweep", "quickstart", "--grid", "data.params.width=32,64", *TINY,
                      "--set", "data.params.width=32", "--runs-dir", "runs"], "data.params.width", "--set")
    assert files(work) == []


# 3. every combination is checked before the first run trains (and by --dry-run)
@pytest.mark.parametrize("dry", [False, True])
@pytest.mark.parametrize("case", ["same_name", "fails_to_build", "last_0", "out_under_file", "run_folder_taken",
                                  "fp16_owned_backward"])
def test_sweep_finds_every_error_before_training(work, capsys, case, dry):
    grid = "weighting.name=equal,dwa"
    extra, needles = {
        "same_name": (["--grid", "weighting.name=equal,equal"], ("quickstart-equal", "twice")),
        # the second combination's model cannot take a 20-pixel-wide image (the first one trains fine)
        "fails_to_build": (["--grid", "data.params.width=32,20"], ("quickstart-20", "--grid data.params.width=20",
                                                                 "first training sample")),
        "last_0": (["--grid", grid, "--last", "0"], ("--last", "0")),
        "out_under_file": (["--grid", grid, "--out", "afile/tables/t"], ("--out", "afile")),
        "run_folder_taken": (["--grid", grid], ("runs/sweep/quickstart-dwa", "already exists")),
        # the first combination trains under fp16, the second's weighting owns its backward
        "fp16_owned_backward": (["--grid", "weighting.name=equal,famo", "--set", "training.precision='fp16'"],
                                ("quickstart-famo", "FAMO owns its backward step")),
    }[case]
    (work / "afile").write_text("x")
    if case == "run_folder_taken":  # a sweep run before into the same --runs-dir
        (work / "runs" / "sweep" / "quickstart-dwa").mkdir(parents=True)
    before = files(work)
    if case != "fails_to_build":
        extra = [*extra, "--set", "data.params.width=32"]
    one_line(capsys, ["sweep", "quickstart", *extra, *TINY, "--runs-dir", "runs", "--quiet",
                      *(["--dry-run"] if dry else [])], *needles)
    assert files(work) == before  # nothing trained, nothing written


def test_sweep_writes_its_table_into_a_new_out_folder(work, capsys):
    """The one training run here: --out in a folder that does not exist yet is made after the runs."""
    rc = main(["sweep", "shapes", *SHAPES, "--grid", "weighting.name=equal", "--runs-dir", "runs",
               "--out", "tables/t", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((work / "runs/sweep/shapes-equal/results.json").read_text())["epochs_done"] == 1
    assert "| equal |" in (work / "tables" / "t.md").read_text() and (work / "tables" / "t.csv").is_file()


# 4. run arguments that contradict each other
@pytest.mark.parametrize("args,needles", [
    (["quickstart", "--resume", "R"], ("RECIPE 'quickstart'", "--resume R")),
    (["quickstart", "--run-dir", "X", "--runs-dir", "Y"], ("--run-dir X", "--runs-dir Y")),
    (["--resume", "R", "--run-dir", "Z"], ("--run-dir Z", "--resume R")),
    (["--resume", "R", "--runs-dir", "Z"], ("--runs-dir Z", "--resume R")),
    (["--resume", "R", "--synthetic"], ("--synthetic", "--resume R")),
])
def test_run_refuses_contradicting_arguments(work, capsys, args, needles):
    (work / "R").mkdir()
    (work / "R" / "recipe.toml").write_text("x")
    before = files(work)
    one_line(capsys, ["run", *args, "--quiet"], *needles, "not both")
    assert files(work) == before


# 5. a logger's folder or file that is one of the run folder's own
@pytest.mark.parametrize("loggers,needles", [
    ('[{name="tensorboard",params={dir="results.json"}}]', ("dir", "results.json", "run folder's own")),
    ('[{name="tensorboard",params={dir="checkpoints"}}]', ("dir", "checkpoints")),
    ('[{name="tensorboard",params={dir="../up"}}]', ("dir", "../up")),
    ('[{name="csv"},{name="tensorboard",params={dir="scalars.csv"}}]',
     ("loggers[1].params.dir", "scalars.csv", "loggers[0].params.file")),
])
def test_logger_paths_that_collide_are_refused_at_validation(work, capsys, loggers, needles):
    one_line(capsys, ["validate", "quickstart", "--set", f"loggers={loggers}"], "--set loggers=", *needles)
    one_line(capsys, ["run", "quickstart", *TINY, "--set", f"loggers={loggers}", "--runs-dir", "runs", "--quiet"],
             *needles)
    assert files(work) == []


# 6. plugins: the type is checked before anything is imported
@pytest.mark.parametrize("value,needles", [('"notalist"', ("plugins:", "expected a list", "'notalist'")),
                                           ("[3]", ("plugins[0]", "3", "string")),
                                           ('["ok_name", 3]', ("plugins[1]",))])
def test_plugins_of_the_wrong_type_are_one_line(work, capsys, value, needles):
    recipe = work / "r.toml"
    recipe.write_text(f"plugins = {value}\n[model.backbone]\nname = 'small_cnn'\n[tasks.a]\nname = 'x'\n")  # rest: unread
    line = one_line(capsys, ["validate", str(recipe)], str(recipe), *needles)
    assert "failed to import" not in line


# 7. an error a --set (or --grid) caused names it, not the recipe file
def test_errors_from_overrides_name_the_override(work, capsys):
    line = one_line(capsys, ["validate", "quickstart", "--set", "nonexist.x=1"], "--set nonexist.x=1",
                    "nonexist", "unknown field")
    assert "quickstart.toml" not in line
    line = one_line(capsys, ["validate", "quickstart", "--set", "weighting.params.foo=1"],
                    "--set weighting.params.foo=1", "foo")
    assert "quickstart.toml" not in line
    one_line(capsys, ["sweep", "quickstart", "--grid", "nonexist.x=1,2", "--runs-dir", "runs"],
             "--grid nonexist.x=1", "nonexist", "unknown field")
    one_line(capsys, ["sweep", "quickstart", "--grid", "weighting.name=equal,nope", "--runs-dir", "runs"],
             "--grid weighting.name=nope", "unknown weighting")
    one_line(capsys, ["sweep", "quickstart", "--grid", "training.epochs.x=1", "--runs-dir", "runs"],
             "--grid 'training.epochs.x=1'", "not a table")
    assert files(work) == []


def test_a_field_the_file_has_is_still_blamed_on_the_file(work, capsys):
    from mtlkit.recipe.loader import builtin_recipes

    recipe = work / "r.toml"
    recipe.write_text(builtin_recipes()["shapes"].read_text() + "\n[nonexist]\ny = 1\n")
    line = one_line(capsys, ["validate", str(recipe), "--set", "nonexist.x=1"], "nonexist", "unknown field")
    assert line.startswith(f"error: {recipe}")


def test_a_folder_given_as_the_recipe_is_named_a_folder(tmp_path, capsys):
    from mtlkit.cli import main

    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: recipe '{tmp_path}' is a folder: give a recipe file (.toml) or a built-in recipe's name"]


def test_a_run_that_fails_midway_names_its_combination(work, capsys):
    """The second combination diverges: the error names it and its --grid values."""
    rc = main(["sweep", "shapes", *SHAPES, "--grid", "optimizer.lr=0.003,1e30", "--runs-dir", "runs", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: sweep run shapes-1e30 (shapes --grid optimizer.lr=1e30): task '"), err
    assert "loss is nan" in err and err.endswith("no checkpoint had been saved yet")
    assert (work / "runs" / "sweep" / "shapes-0.003" / "results.json").is_file()
