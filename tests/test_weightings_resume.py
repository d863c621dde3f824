"""Every registered weighting resumes bit-identically: a run interrupted in mid-epoch and
resumed from its checkpoint ends with the same model, optimiser and weighting state as an
uninterrupted one (tensors in the weighting's state_dict, JSON in get_state)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mtlkit.engine import Trainer
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_data, make_model, make_tasks, state_equal  # noqa: E402

TASKS = ("shape", "colour", "size")
# settings that bring a method's state into play within two epochs of four steps
PARAMS = {"stch": {"warmup_epochs": 0}, "nash_mtl": {"update_weights_every": 3}, "dwa": {"temperature": 2.0}}


def build(run_dir, name):
    run_dir.mkdir(exist_ok=True)
    tasks = make_tasks(TASKS)
    train, val = make_data(num_train=16, num_val=4)
    model = make_model(tasks, dropout=0.5)
    comp = get_registry().get("weighting", name)
    weighting = comp.build(PARAMS.get(name, {}), task_names=list(tasks))
    trainer = Trainer(model, tasks, train, val, weighting=weighting, optimizer={"name": "adam", "lr": 1e-2},
                      training=dict(epochs=2, batch_size=4, log_interval=100, seed=3, device="cpu"),
                      run_dir=run_dir, quiet=True)
    return trainer, model, weighting


def stop_after(trainer, epoch: int, step: int) -> None:
    """A KeyboardInterrupt right after ``step`` of ``epoch`` (1-based), between two steps."""
    shown = trainer.reporter.step

    def step_shown(e, s, losses, lr):
        shown(e, s, losses, lr)
        if (e + 1, s) == (epoch, step):
            raise KeyboardInterrupt

    trainer.reporter.step = step_shown


@pytest.mark.parametrize("name", get_registry().names("weighting"))
def test_mid_epoch_resume_is_bit_identical(tmp_path, name):
    ref_trainer, ref_model, ref_w = build(tmp_path / "ref", name)
    ref_trainer.fit()
    first = build(tmp_path / "run", name)
    stop_after(first[0], 2, 2)
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    trainer, model, weighting = build(tmp_path / "run", name)
    trainer.fit(resume_from=tmp_path / "run")
    assert state_equal(model, ref_model), f"{name}: model weights differ"
    assert state_equal(weighting, ref_w), f"{name}: weighting tensors differ"
    assert weighting.get_state() == ref_w.get_state(), f"{name}: weighting state differs"
    assert weighting.weights() == ref_w.weights()
    sa, sb = trainer.optimizer.state_dict()["state"], ref_trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(v, sb[k][n]) for k in sa for n, v in sa[k].items())


@pytest.mark.parametrize("name", [n for n in get_registry().names("weighting")
                                  if "solver" in get_registry().get("weighting", n).params.model_fields])
def test_mid_epoch_resume_with_the_device_solver_is_bit_identical(tmp_path, monkeypatch, name):
    """solver = "device" keeps no state of its own (its coefficients are recomputed each step)."""
    monkeypatch.setitem(PARAMS, name, {**PARAMS.get(name, {}), "solver": "device"})
    test_mid_epoch_resume_is_bit_identical(tmp_path, name)
