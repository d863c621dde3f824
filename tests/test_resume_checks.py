"""A resume is refused, before anything in the run folder changes, when a file it writes is
not a regular file (log.jsonl or results.json a folder), or when ``training.epochs`` is
fewer than the epochs the checkpoint has already trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtlkit.cli import main
from mtlkit.recipe.loader import load_recipe
from mtlkit.runner import RunInterrupted, build_trainer

SETS = {"model.backbone.params.widths": [4, 8], "data.params.size": 8, "data.params.num_train": 16,
        "data.params.num_val": 8, "training.batch_size": 8, "training.device": "cpu"}  # 2 steps an epoch


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run of 200 epochs interrupted in epoch 3: its checkpoint has trained 2 epochs."""
    run = tmp_path_factory.mktemp("runs") / "run"
    built = build_trainer("shapes", overrides={**SETS, "training.epochs": 200}, run_dir=run)
    task = built.trainer.tasks["shape"]
    original, calls = task.loss, [0]

    def loss(prediction, target):
        calls[0] += 1
        if calls[0] == 5:  # epoch 3, step 1: the last checkpoint is epoch 2's end
            raise KeyboardInterrupt
        return original(prediction, target)

    task.loss = loss
    with pytest.raises(RunInterrupted):
        built.fit()
    return run


def refused(run: Path, capsys, *sets: str) -> str:
    before = snapshot(run)
    capsys.readouterr()
    rc = main(["run", "--resume", str(run), *[a for s in sets for a in ("--set", s)], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before  # recipe.toml not rewritten, nothing added or removed
    return err


@pytest.mark.parametrize("name", ["log.jsonl", "results.json"])
def test_a_run_file_that_is_a_folder_is_refused_before_any_write(interrupted_run, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    (run / name).unlink()
    (run / name).mkdir()
    err = refused(run, capsys, "training.epochs=300")
    assert str(run / name) in err and "not a regular file" in err, err
    assert load_recipe(run / "recipe.toml").recipe.training.epochs == 200


def test_fewer_epochs_than_trained_is_refused(interrupted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    err = refused(run, capsys, "training.epochs=1")
    assert "training.epochs = 1: the run has already trained 2 epochs; give 2 or more" in err, err
    assert load_recipe(run / "recipe.toml").recipe.training.epochs == 200
    # as many as trained: nothing to train, the run ends where its checkpoint is
    assert main(["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"]) == 0
    assert load_recipe(run / "recipe.toml").recipe.training.epochs == 2
    # and it goes on when extended
    assert main(["run", "--resume", str(run), "--set", "training.epochs=3", "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 3


def test_the_trainer_refuses_a_log_that_is_a_folder_before_writing(tmp_path):
    """Trainer(run_dir=...) without the CLI: the same one-line refusal, the folder as it was."""
    from mtlkit.engine.runfiles import RunFiles
    from mtlkit.errors import CheckpointError

    (tmp_path / "log.jsonl").mkdir()
    with pytest.raises(CheckpointError, match="log.jsonl: not a regular file"):
        RunFiles(tmp_path, writes=True)
    assert snapshot(tmp_path) == {"log.jsonl": None}
    RunFiles(tmp_path, writes=False)  # not rank 0: writes nothing, checks nothing
