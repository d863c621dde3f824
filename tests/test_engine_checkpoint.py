"""Checkpoints: exact resume, interrupts, NaN handling, file validation."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from mtlkit.engine import Trainer, load_model_weights
from mtlkit.engine.checkpoint import load_checkpoint, read_safetensors, resolve_checkpoint, sha256_file
from mtlkit.errors import CheckpointError, TrainingError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import Uncertainty, make_data, make_model, make_tasks, state_equal  # noqa: E402

CFG = dict(epochs=2, batch_size=4, log_interval=100, seed=3)  # 16 samples -> 4 steps an epoch


def build(run_dir, tasks=None, m2m=False, reorder=False, **training):
    tasks = tasks or make_tasks()
    train, val = make_data(num_train=16)
    if m2m:
        train2, val2 = make_data(num_train=10, num_val=5, seed=1)
        train, val = {"shape": train, "colour": train2}, {"shape": val, "colour": val2}
    model = make_model(tasks, dropout=0.5)  # dropout: the RNG state must be restored too
    if reorder:  # the same network with its parameters registered in another order (heads first)
        model._modules = OrderedDict(reversed(model._modules.items()))
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


def interrupt_after_step(trainer, epoch: int, step: int) -> None:
    """A KeyboardInterrupt between two steps (as a second Ctrl-C arriving while the next
    batch loads): raised by the progress display right after ``step`` of ``epoch`` (1-based)."""
    original = trainer.reporter.step

    def step_shown(e, s, losses, lr):
        original(e, s, losses, lr)
        if (e + 1, s) == (epoch, step):
            raise KeyboardInterrupt

    trainer.reporter.step = step_shown


@pytest.mark.parametrize("how", ["raise", "signal", "between"])
def test_interrupt_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, reference, how):
    tasks = make_tasks()
    if how != "between":
        interrupt_at(tasks["shape"], 6, how)  # step 6 = epoch 2, step 2
    first = build(tmp_path, tasks=tasks)
    if how == "between":
        interrupt_after_step(first[0], 2, 1)  # after step 5 = epoch 2, step 1
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    meta = load_checkpoint(tmp_path)[0]
    # a signal lets step 6 finish and saves it; an interrupt between steps saves the state
    # after step 5; one raised inside step 6 (a second Ctrl-C) saves nothing: the state is
    # half-updated, and the end of epoch 1's checkpoint stays
    expected = {"raise": (1, 0, 4), "signal": (1, 2, 6), "between": (1, 1, 5)}[how]
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == expected
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
    interrupt_at(tasks["colour"], 4, "signal")  # epoch 2, step 2: the step finishes, then a save
    first = build(run_dir, tasks=tasks, m2m=True, domain_order="round_robin")
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    meta = load_checkpoint(run_dir)[0]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 2)  # mid-epoch
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
    with pytest.raises(TrainingError, match=r"task 'colour'.*nan.*epoch 2 step 2 \(global step 6\); "
                                            r"the last good checkpoint \(global step 4\) is kept$"):
        trainer.fit()
    meta, tensors, _ = load_checkpoint(tmp_path)
    assert meta["global_step"] == 4  # the end of epoch 1, not overwritten
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    # losses are read once per log interval (here: at the epoch's end, after step 8): the
    # error still names step 6, and the log holds the good steps before it
    logged = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in logged if r["type"] == "step"] == [1, 2, 3, 4, 5]


def test_nan_loss_before_the_first_checkpoint_says_there_is_none(tmp_path):
    tasks = make_tasks()
    original = tasks["colour"].loss
    tasks["colour"].loss = lambda p, t: original(p, t) * float("nan")
    trainer, _, _ = build(tmp_path, tasks=tasks)
    with pytest.raises(TrainingError, match=r"global step 1\); no checkpoint had been saved yet$"):
        trainer.fit()


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_the_one_kept(tmp_path, monkeypatch):
    import errno

    import mtlkit.engine.snapshot as snapshot

    real, saves = snapshot.save_checkpoint, []

    def full_disk(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "save_checkpoint", full_disk)
    trainer, _, _ = build(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        trainer.fit()
    assert str(exc.value) == (f"{tmp_path / 'checkpoints'}: saving the checkpoint of global step 8 failed "
                              f"(No space left on device); the last good checkpoint (global step 4) is kept")
    assert load_checkpoint(tmp_path)[0]["global_step"] == 4


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



# -- optimiser state by parameter name -------------------------------------------------------------
def optimizer_state_by_name(trainer):
    names = {id(p): f"model.{n}" for n, p in trainer.raw_model.named_parameters()}
    names.update({id(p): f"weighting.{n}" for n, p in trainer.weighting.named_parameters()})
    return {names[id(p)]: st for p, st in trainer.optimizer.state.items()}


def test_optimizer_state_lands_on_its_parameter_after_reordering(tmp_path, reference):
    """A model whose parameters are registered in another order resumes with each
    parameter's own Adam moments, and ends exactly where the uninterrupted run does."""
    build(tmp_path, epochs=1)[0].fit()
    resumed = build(tmp_path, reorder=True)
    order = [n for n, _ in resumed[1].named_parameters()]
    assert order[0].startswith("heads.") and order[-1].startswith("backbone.")  # positions moved
    resumed[0].fit(resume_from=tmp_path)
    ref = reference[0][0]
    assert state_equal(reference[0][1], resumed[1]) and state_equal(reference[0][2], resumed[2])
    got, want = optimizer_state_by_name(resumed[0]), optimizer_state_by_name(ref)
    assert got.keys() == want.keys() and len(got) == len(order) + 1  # + the weighting's log_vars
    for name in want:
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value), (name, key)


def test_checkpoint_with_positional_optimizer_state_is_refused(tmp_path):
    """Checkpoints of older mtlkit versions stored optimiser state by position: resuming one
    is refused in one line naming the file (and nothing is written); its weights still load."""
    build(tmp_path, epochs=1)[0].fit()
    meta_path = resolve_checkpoint(tmp_path)
    meta = json.loads(meta_path.read_text())
    tensors = read_safetensors(meta_path.with_name("model.safetensors"))
    names = [n for g in meta["optimizer"]["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    old = {}
    for key, value in tensors.items():  # optimizer.<name>.<key> -> optimizer.<position>.<key>
        if key.startswith("optimizer."):
            name, state_key = key[len("optimizer."):].rsplit(".", 1)
            key = f"optimizer.{index[name]}.{state_key}"
        old[key] = value
    from safetensors.torch import save_file

    save_file(old, str(meta_path.with_name("model.safetensors")), metadata={"format": "mtlkit-checkpoint"})
    opt = meta["optimizer"]
    del opt["layout"]
    offset = 0
    for g in opt["param_groups"]:
        g["params"], offset = list(range(offset, offset + len(g["params"]))), offset + len(g["params"])
    opt["extra_state"] = {str(index[n]): v for n, v in opt["extra_state"].items()}
    meta["tensors_bytes"] = meta_path.with_name("model.safetensors").stat().st_size
    meta["tensors_sha256"] = sha256_file(meta_path.with_name("model.safetensors"))
    meta_path.write_text(json.dumps(meta))
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    trainer, model, _ = build(tmp_path)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        trainer.fit(resume_from=tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(meta_path))
    assert "written by an older mtlkit" in message and "by position" in message
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    report = load_model_weights(make_model(make_tasks()), tmp_path)
    assert report["loaded"] and not report["skipped"]


def test_a_cuda_graph_runs_checkpoint_resumes_on_a_cpu(tmp_path):
    """A run with training.cuda_graph saves Adam's groups with capturable = true (step counts
    on the GPU); on a CPU, where capturable Adam cannot step, its resume keeps this run's
    choice instead of the checkpoint's."""
    run = tmp_path / "run"
    run.mkdir()
    trainer, _, _ = build(run, epochs=1)
    trainer.fit()
    meta_path = resolve_checkpoint(run)
    meta = json.loads(meta_path.read_text())
    groups = meta["optimizer"]["param_groups"]
    assert groups and all(g.get("capturable") is False for g in groups)
    for g in groups:
        g["capturable"] = True  # as an Adam built for CUDA graphs saves it
    meta_path.write_text(json.dumps(meta))
    resumed, _, _ = build(run, epochs=2)
    resumed.fit(resume_from=run)
    assert resumed.epoch == 2
    assert all(g["capturable"] is False for g in resumed.optimizer.param_groups)

