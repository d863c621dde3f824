"""Checkpoints: exact resume, interrupts, NaN handling, file validation."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from mtlkit.engine import Trainer, load_model_weights
from mtlkit.engine.checkpoint import load_checkpoint, resolve_checkpoint
from mtlkit.errors import CheckpointError, TrainingError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import Uncertainty, make_data, make_model, make_tasks, state_equal  # noqa: E402

CFG = dict(epochs=2, batch_size=4, log_interval=100, seed=3)  # 16 samples -> 4 steps an epoch


def build(run_dir, tasks=None, m2m=False, **training):
    tasks = tasks or make_tasks()
    train, val = make_data(num_train=16)
    if m2m:
        train2, val2 = make_data(num_train=10, num_val=5, seed=1)
        train, val = {"shape": train, "colour": train2}, {"shape": val, "colour": val2}
    model = make_model(tasks, dropout=0.5)  # dropout: the RNG state must be restored too
    weighting = Uncertainty(list(tasks))  # trained tensors + JSON state
    trainer = Trainer(model, tasks, train, val, weighting=weighting, optimizer={"name": "adam", "lr": 1e-2},
                      schedule={"name": "step", "step_size": 1, "gamma": 0.5},
                      training={**CFG, **training}, run_dir=run_dir, quiet=True)
    return trainer, model, weighting


def interrupt_at(task, call: int, how: str):
    """Make ``task.loss`` interrupt on its ``call``-th call (raise, or a real SIGINT)."""
    original = task.loss
    count = {"n": 0}

    def loss(prediction, target):
        count["n"] += 1
        if count["n"] == call:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # deferred: the step finishes first
        return original(prediction, target)

    task.loss = loss


def assert_same_run(a, b):
    (ta, ma, wa), (tb, mb, wb) = a, b
    assert state_equal(ma, mb), "weights differ"
    assert state_equal(wa, wb)
    assert wa.epochs_seen == wb.epochs_seen
    sa, sb = ta.optimizer.state_dict(), tb.optimizer.state_dict()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name])
    assert ta.global_step == tb.global_step and ta.history == tb.history


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run = build(d)
    run[0].fit()
    return run, d


def test_resume_at_epoch_boundary_is_bit_identical(tmp_path, reference):
    first = build(tmp_path, epochs=1)
    first[0].fit()
    second = build(tmp_path)
    second[0].fit(resume_from=tmp_path)
    assert_same_run(reference[0], second)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_interrupt_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, reference, how):
    tasks = make_tasks()
    interrupt_at(tasks["shape"], 6, how)  # step 6 = epoch 2, step 2
    first = build(tmp_path, tasks=tasks)
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    meta = load_checkpoint(tmp_path)[0]
    # a raised interrupt abandons step 6; a signal lets it finish
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == ((1, 1, 5) if how == "raise" else (1, 2, 6))
    resumed = build(tmp_path)
    resumed[0].fit(resume_from=tmp_path)
    assert_same_run(reference[0], resumed)
    # the log holds each step once, as the uninterrupted run's
    steps = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(l) for l in (reference[1] / "log.jsonl").read_text().splitlines()]
    key = lambda r: (r["type"], r["global_step"], json.dumps(r.get("losses")))  # noqa: E731
    assert [key(r) for r in steps] == [key(r) for r in ref_steps]


def test_many_to_many_mid_epoch_resume(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = build(ref_dir, m2m=True, domain_order="round_robin")
    ref[0].fit()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tasks = make_tasks()
    interrupt_at(tasks["colour"], 4, "raise")
    first = build(run_dir, tasks=tasks, m2m=True, domain_order="round_robin")
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    resumed = build(run_dir, m2m=True, domain_order="round_robin")
    resumed[0].fit(resume_from=run_dir)
    assert_same_run(ref, resumed)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    tasks = make_tasks()
    original = tasks["colour"].loss
    count = {"n": 0}

    def loss(p, t):
        count["n"] += 1
        out = original(p, t)
        return out * float("nan") if count["n"] == 6 else out

    tasks["colour"].loss = loss
    trainer, model, _ = build(tmp_path, tasks=tasks)
    with pytest.raises(TrainingError, match=r"task 'colour'.*nan.*epoch 2 step 2 \(global step 6\)"):
        trainer.fit()
    meta, tensors, _ = load_checkpoint(tmp_path)
    assert meta["global_step"] == 4  # the end of epoch 1, not overwritten
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    # the NaN never reached the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_refuses_non_runs_and_bad_files(tmp_path):
    trainer, model, _ = build(None, epochs=1)
    with pytest.raises(CheckpointError, match="not an mtlkit run folder"):
        trainer.fit(resume_from=tmp_path)

    run = tmp_path / "run"
    run.mkdir()
    build(run, epochs=1)[0].fit()
    meta_path = resolve_checkpoint(run)
    tensors = meta_path.with_name("model.safetensors")
    data = tensors.read_bytes()

    # truncated tensor file: named in the error
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step-4/model.safetensors"):
        build(None)[0].fit(resume_from=run)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(make_model(make_tasks()), tensors)

    # a pickle (torch.save) is never unpickled
    torch.save(make_model(make_tasks()).state_dict(), tensors)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(make_model(make_tasks()), tensors)

    # a JSON that is not ours
    meta_path.write_text("{\"epoch\": 1}")
    with pytest.raises(CheckpointError, match="step-4/meta.json"):
        build(None)[0].fit(resume_from=run)


def test_resume_refuses_other_recipe(tmp_path):
    tasks = make_tasks()
    train, val = make_data()
    kw = dict(training=dict(epochs=1, batch_size=8), run_dir=tmp_path, quiet=True)
    Trainer(make_model(tasks), tasks, train, recipe={"a": 1}, **kw).fit()
    with pytest.raises(CheckpointError, match="different recipe"):
        Trainer(make_model(tasks), tasks, train, recipe={"a": 2}, **kw).fit(resume_from=tmp_path)
    Trainer(make_model(tasks), tasks, train, recipe={"a": 1}, **kw).fit(resume_from=tmp_path)


def test_load_model_weights(tmp_path):
    tasks = make_tasks()
    run = tmp_path / "run"
    run.mkdir()
    trainer, model, _ = build(run, epochs=1)
    trainer.fit()
    fresh = make_model(tasks, seed=9)
    report = load_model_weights(fresh, resolve_checkpoint(run).with_name("model.safetensors"), key_filter="backbone.*")
    assert report["loaded"] and all(k.startswith("backbone.") for k in report["loaded"])
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(sd[k], fsd[k]) for k in report["loaded"])
    assert not torch.equal(sd["heads.shape.fc.weight"], fsd["heads.shape.fc.weight"])
    load_model_weights(fresh, run)  # a run folder: everything
    assert state_equal(model, fresh)

    # strict shapes, clear errors
    other = make_model(make_tasks(num_colours=5))
    with pytest.raises(CheckpointError, match=r"heads.colour.fc.(weight|bias).*shape"):
        load_model_weights(other, run)
    assert state_equal(other, make_model(make_tasks(num_colours=5)))  # nothing half-loaded
    with pytest.raises(CheckpointError, match="no tensors"):
        load_model_weights(fresh, run, key_filter="nothing.*")

