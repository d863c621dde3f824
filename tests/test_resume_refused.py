"""`mtlkit run` refuses before it writes: a refused resume leaves the run folder byte for
byte as it was (so the run can still be resumed), a refused new run leaves no run folder,
and a run killed before its first save says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtlkit.cli import main
from mtlkit.recipe.loader import load_recipe

TINY = ["--set", "model.backbone.params.widths=[4, 8]", "--set", "data.params.size=8",
        "--set", "data.params.num_train=16", "--set", "data.params.num_val=8",
        "--set", "training.batch_size=8", "--set", "training.device='cpu'", "--quiet"]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", "shapes", *TINY, "--set", "training.epochs=1", "--run-dir", str(run)]) == 0
    return run


def test_refused_resume_writes_nothing_and_the_run_stays_resumable(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--set", "optimizer.lr=0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before  # recipe.toml not rewritten, nothing added
    # so the run goes on: as it was, and extended (the one change a resume may make)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert main(["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"]) == 0
    assert load_recipe(run / "recipe.toml").recipe.training.epochs == 2


def test_resume_of_a_damaged_checkpoint_writes_nothing(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    tensors = next((run / "checkpoints").glob("step-*/model.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    before = snapshot(run)
    assert main(["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert snapshot(run) == before


def test_run_killed_before_its_first_save(one_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"  # what such a run leaves: its recipe and log, no checkpoint
    run.mkdir()
    for name in ("recipe.toml", "log.jsonl"):
        shutil.copy(one_epoch_run / name, run / name)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run}: no checkpoint was completed (the run was interrupted before its first save)\n"
    assert snapshot(run) == before


def test_refused_new_run_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    missing = (tmp_path / "missing.safetensors").as_posix()
    rc = main(["run", "shapes", *TINY, "--set", f"model.init_from.path='{missing}'", "--run-dir", str(run)])
    assert rc == 2 and "missing.safetensors" in capsys.readouterr().err
    assert not run.exists()
