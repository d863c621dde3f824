"""``mtlkit.run_recipe`` / ``mtlkit.build_trainer``: the Python twin of ``mtlkit run``, and
``mtlkit sweep`` on top of it."""

from __future__ import annotations

import json

import pytest
import torch

import mtlkit
from mtlkit.engine.checkpoint import load_checkpoint
from mtlkit.cli import main
from mtlkit.errors import ConfigError
from mtlkit.runner import RunInterrupted

# quickstart at a size that trains in seconds
QUICK = {"model.backbone.params.width": 0.0625, "data.params.height": 32, "data.params.width": 32,
         "data.params.num_train": 4, "data.params.num_val": 2, "training.epochs": 2, "training.batch_size": 2,
         "training.eval_interval": 1, "training.max_steps_per_epoch": 2, "training.device": "cpu"}
SHAPES = {"model.backbone.params.widths": [4, 8], "data.params.size": 8, "data.params.num_train": 8,
          "data.params.num_val": 4, "training.batch_size": 4, "training.epochs": 1, "training.device": "cpu"}


def as_sets(overrides: dict) -> list[str]:
    """The same overrides as the command line writes them."""
    args = []
    for key, value in overrides.items():
        text = json.dumps(value) if not isinstance(value, str) else f"'{value}'"
        args += ["--set", f"{key}={text}"]
    return args


def test_cli_and_python_give_the_same_run(tmp_path, capsys):
    by_cli, by_python = tmp_path / "cli", tmp_path / "python"
    assert main(["run", "quickstart", *as_sets(QUICK), "--quiet", "--run-dir", str(by_cli)]) == 0
    assert f"run folder: {by_cli}" in capsys.readouterr().out
    result = mtlkit.run_recipe("quickstart", overrides=QUICK, run_dir=by_python)
    assert result.run_dir == by_python
    assert (by_python / "results.json").read_bytes() == (by_cli / "results.json").read_bytes()
    assert (by_python / "recipe.toml").read_text() == (by_cli / "recipe.toml").read_text()
    assert result.metrics == result.results["final"] and set(result.metrics) == {"segmentation", "depth", "normal"}
    a, b = (load_checkpoint(run)[1] for run in (by_cli, by_python))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_trainer_makes_the_run_folder_and_trains_on_fit(tmp_path):
    built = mtlkit.build_trainer("shapes", overrides=SHAPES, runs_dir=tmp_path / "runs")
    assert built.run_dir.parent == tmp_path / "runs" / "shapes" and built.created is not None
    assert (built.run_dir / "recipe.toml").is_file() and not (built.run_dir / "checkpoints").exists()
    assert built.trainer.epoch == 0 and built.resume_dir is None
    result = built.fit()
    assert result.run_dir == built.run_dir and built.trainer.epoch == 1
    assert (built.run_dir / "checkpoints" / "last.json").is_file()
    # ... and it resumes from Python, one epoch more
    more = mtlkit.run_recipe(resume=built.run_dir, overrides={"training.epochs": 2})
    assert more.run_dir == built.run_dir and more.results["epochs_done"] == 2


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_run_that_stops_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, failure):
    built = mtlkit.build_trainer("shapes", overrides=SHAPES, run_dir=tmp_path / "a" / "b" / "run")

    def fail(resume_from=None):
        raise failure

    monkeypatch.setattr(built.trainer, "fit", fail)
    expected = RunInterrupted if isinstance(failure, KeyboardInterrupt) else RuntimeError
    with pytest.raises(expected) as info:
        built.fit()
    assert not (tmp_path / "a").exists()  # the run folder and the parents made for it
    if expected is RunInterrupted:
        assert info.value.removed and info.value.run_dir == tmp_path / "a" / "b" / "run"


def test_argument_errors_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="give a RECIPE"):
        mtlkit.run_recipe()
    with pytest.raises(ConfigError, match="not both"):
        mtlkit.run_recipe("shapes", resume=tmp_path)
    with pytest.raises(ConfigError, match="batch_sise"):
        mtlkit.run_recipe("shapes", overrides=["training.batch_sise=3"])
    assert list(tmp_path.iterdir()) == []


def test_sweep_runs_the_grid_and_compares(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = main(["sweep", "shapes", *as_sets(SHAPES), "--grid", "weighting.name=equal,dwa", "--quiet",
               "--runs-dir", str(runs)])
    assert rc == 0, capsys.readouterr().err
    for name in ("shapes-equal", "shapes-dwa"):
        assert json.loads((runs / "sweep" / name / "results.json").read_text())["epochs_done"] == 1
    table = (runs / "sweep" / "compare.md").read_text()
    assert "| equal |" in table and "| dwa |" in table


def test_ctrl_c_after_a_checkpoint_points_at_resume(tmp_path, monkeypatch, capsys):
    """Interrupted after its first checkpoint, `mtlkit run` says how to continue (the trainer
    has said which checkpoint stands) and exits 130; the resume then finishes the run."""
    from mtlkit.engine.trainer import Trainer
    from mtlkit.testing import TINY_CLASSIFICATION_RECIPE

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_CLASSIFICATION_RECIPE.replace("epochs = 1", "epochs = 2"))
    run_epoch = Trainer._run_epoch

    def stop_in_the_second_epoch(self, *args, **kwargs):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return run_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_run_epoch", stop_in_the_second_epoch)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--quiet", "--run-dir", str(run)]) == 130
    assert f"interrupted: continue with mtlkit run --resume {run}" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert load_checkpoint(run)[0]["epoch"] == 2
