"""A checkpoint is committed as one unit.

The kill test runs a tiny 3-epoch training in forked children and SIGKILLs it just before
(or, for temp-file creation, just after) every file-system change the run makes: creating,
fsyncing and renaming each file, making each folder, removing each superseded file. For each
kill point a fresh child resumes the run folder and trains to the end; its final weights,
optimiser and weighting state must equal an uninterrupted run's bit for bit, it must have
resumed from the last checkpoint that was complete when the process died, and no temp file
or superseded checkpoint may be left behind.

Forking a process that has imported everything (rather than starting ``python`` twice per
kill point) keeps the ~70 kill points to about half a minute.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtlkit.engine import Trainer
from mtlkit.engine.checkpoint import load_checkpoint, pack_state
from mtlkit.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import Uncertainty, make_data, make_model, make_tasks  # noqa: E402

pytestmark = pytest.mark.skipif(not (hasattr(os, "fork") and os.path.isdir("/proc/self/fd")),
                                reason="the kill harness forks and names file descriptors via /proc")

# The best metric per epoch, scripted so that best (epoch 2) and last (epoch 3) differ and
# the save of epoch 2 supersedes epoch 1's checkpoint: every kind of save is exercised.
SCRIPTED_LOSS = {1: 2.0, 2: 1.0, 3: 3.0}
NO_CHECKPOINT = "no checkpoint was completed (the run was interrupted before its first save)"


class ScriptedBest(Trainer):
    """Real evaluation, but the best metric follows SCRIPTED_LOSS; keeps each evaluated state."""

    def evaluate(self, split_data=None):
        metrics = super().evaluate(split_data)
        if split_data is None:
            metrics["shape"]["loss"] = SCRIPTED_LOSS[self.epoch]
            self.evaluated[self.epoch] = {k: v.clone() for k, v in self.raw_model.state_dict().items()}
        return metrics


def build(run_dir, epochs: int = 3) -> ScriptedBest:
    tasks = make_tasks()
    train, val = make_data(num_train=8, num_val=4)
    trainer = ScriptedBest(make_model(tasks, dropout=0.5), tasks, train, val, weighting=Uncertainty(list(tasks)),
                           optimizer={"name": "adam", "lr": 1e-2},
                           training=dict(epochs=epochs, batch_size=4, seed=3, best_metric="shape/loss",
                                         log_interval=100),
                           run_dir=run_dir, quiet=True)
    trainer.evaluated = {}
    return trainer


# -- fault injection ---------------------------------------------------------------------------
def patch_file_ops(run: Path, kill_at: int, trace: list) -> None:
    """Count every file-system change this process makes inside ``run`` (trace: [op, path]);
    SIGKILL it at the ``kill_at``-th. A temp file counts once created (the state before its
    first write); every other operation counts before it happens."""
    count = [0]
    root = os.path.realpath(run)

    def where(target, dir_fd=None) -> str:  # fds and dir_fd-relative names as paths (Linux)
        if isinstance(target, int):
            return os.readlink(f"/proc/self/fd/{target}")
        if dir_fd is not None:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), target)
        return os.path.realpath(target)

    def hit(op: str, path: str) -> None:
        if not (path == root or path.startswith(root + os.sep)):
            return  # not the run's (torch may make cache folders)
        count[0] += 1
        trace.append([op, os.path.relpath(path, root)])
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def before(name: str, path_arg: int):
        real = getattr(os, name)

        def op(*args, **kw):
            hit(name, where(args[path_arg], kw.get("dir_fd")))
            return real(*args, **kw)
        setattr(os, name, op)

    for name, path_arg in (("replace", 1), ("rename", 1), ("fsync", 0), ("mkdir", 0), ("unlink", 0),
                           ("remove", 0), ("rmdir", 0)):
        before(name, path_arg)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kw):
        fd, path = real_mkstemp(*args, **kw)
        hit("create", os.path.realpath(path))
        return fd, path
    tempfile.mkstemp = mkstemp


def in_child(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked process: its exit code, or minus the signal that killed it."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # a collection in the child would otherwise walk (and copy) the parent's whole heap
    pid = os.fork()
    if pid:
        gc.unfreeze()
    else:  # pragma: no cover (child)
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the progress lines of ~140 trainings
            sys.stdout = open(1, "w", closefd=False)
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def dump(trainer: Trainer, out: Path, **extra) -> None:
    tensors, opt_meta = pack_state(trainer.raw_model, trainer.optimizer, trainer.weighting)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "final.safetensors"))
    (out / "final.json").write_text(json.dumps({
        "global_step": trainer.global_step, "history": trainer.history, "best": trainer.best,
        "weighting": trainer.weighting.get_state(), "optimizer": opt_meta, **extra}))


def child_reference(run: Path, out: Path) -> None:
    trace: list = []
    patch_file_ops(run, 0, trace)  # count only
    trainer = build(run)
    trainer.fit()
    dump(trainer, out, trace=trace)


def child_killed(run: Path, kill_at: int) -> None:
    patch_file_ops(run, kill_at, [])
    build(run).fit()


def child_resume(run: Path, out: Path) -> None:
    try:
        try:
            resumed_from = load_checkpoint(run)[0]["global_step"]
        except CheckpointError as exc:
            resumed_from = str(exc)
        trainer = build(run)
        if isinstance(resumed_from, str):  # no checkpoint: nothing to resume, start over
            trainer.fit()
        else:
            trainer.fit(resume_from=run)
        dump(trainer, out, resumed_from=resumed_from)
    except BaseException:
        (out / "final.json").write_text(json.dumps({"error": traceback.format_exc()}))
        raise


def expected_resume(trace: list, kill_at: int):
    """The global step a run killed at ``kill_at`` must resume from: the checkpoint the last
    pointer switched to ``last.json`` names, or before the first switch the newest step
    folder whose meta.json (written last) was in place; None if neither happened."""
    complete = committed = None
    for op, path in trace[:kill_at - 1]:
        if op in ("replace", "rename") and Path(path).name == "meta.json":
            complete = int(Path(path).parent.name.removeprefix("step-").split(".")[0])
        if op in ("replace", "rename") and Path(path).name == "last.json":
            committed = complete
    return committed if committed is not None else complete


def leftovers(run: Path) -> list[str]:
    """Temp files anywhere, and step folders that no pointer names."""
    bad = [str(p.relative_to(run)) for p in run.rglob("*.tmp")]
    ckpt = run / "checkpoints"
    named = {json.loads((ckpt / f"{n}.json").read_text()).get("dir") for n in ("last", "best")
             if (ckpt / f"{n}.json").is_file()}
    bad += [p.name for p in ckpt.iterdir() if p.is_dir() and p.name not in named]
    return bad


def check_resumed(run: Path, out: Path, expected, ref: dict, ref_tensors: dict, outcomes: dict) -> str | None:
    """What is wrong with the resumed run's outcome, if anything."""
    got = json.loads((out / "final.json").read_text())
    if "error" in got:
        return f"resume failed:\n{got['error']}"
    if expected is None:
        if got["resumed_from"] != f"{run}: {NO_CHECKPOINT}":
            return f"resumed from {got['resumed_from']!r}, expected the error '{NO_CHECKPOINT}'"
        outcomes["restarted"] += 1
    elif got["resumed_from"] != expected:
        return f"resumed from {got['resumed_from']!r}, expected global step {expected}"
    else:
        outcomes["resumed"] += 1
    tensors = load_file(str(out / "final.safetensors"))
    differ = sorted(set(tensors) ^ set(ref_tensors)) or [k for k in tensors if not torch.equal(tensors[k],
                                                                                                 ref_tensors[k])]
    if differ:
        return f"{differ[:3]} differ from the uninterrupted run"
    for field in ("global_step", "history", "best", "weighting", "optimizer"):
        if got[field] != ref[field]:
            return f"{field} differs from the uninterrupted run"
    return f"left behind {leftovers(run)}" if leftovers(run) else None


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder in memory where there is one: the ~140 trainings fsync ~30 times each."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mtlkit-kill-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_kill_at_every_file_operation_resumes_bit_identically(fast_tmp):
    tmp_path = fast_tmp
    build(None).fit()  # here, once: the children inherit every module training imports lazily
    ref_run, ref_out = tmp_path / "ref", tmp_path / "ref-out"
    ref_run.mkdir()
    ref_out.mkdir()
    assert in_child(child_reference, ref_run, ref_out) == 0
    ref = json.loads((ref_out / "final.json").read_text())
    ref_tensors = load_file(str(ref_out / "final.safetensors"))
    trace = ref["trace"]
    assert ref["best"]["epoch"] == 2 and ref["global_step"] == 6  # best and last differ
    assert not leftovers(ref_run)

    outcomes = {"resumed": 0, "restarted": 0}
    failures = []
    for k in range(1, len(trace) + 1):
        run, out = tmp_path / f"k{k}", tmp_path / f"k{k}-out"
        run.mkdir()
        out.mkdir()
        assert in_child(child_killed, run, k) == -signal.SIGKILL, f"operation {k} did not happen"
        in_child(child_resume, run, out)
        problem = check_resumed(run, out, expected_resume(trace, k), ref, ref_tensors, outcomes)
        if problem:
            failures.append(f"killed at operation {k}/{len(trace)} ({' '.join(trace[k - 1])}): {problem}")
    assert not failures, f"{len(failures)} kill points fail:\n" + "\n".join(failures[:5])
    # every save of the run was cut at each of its steps; both outcomes occurred
    assert len(trace) >= 50 and outcomes["resumed"] and outcomes["restarted"], (len(trace), outcomes)


def test_init_from_loads_the_best_checkpoint_not_the_last(tmp_path):
    from mtlkit.earlier_runs import init_from
    from mtlkit.recipe.schema import InitFrom

    run = tmp_path / "runs" / "20240101-000000"
    run.mkdir(parents=True)
    trainer = build(run)
    trainer.fit()
    best, last = trainer.evaluated[2], trainer.evaluated[3]
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for path in (run, run.parent):  # a run folder, and a folder of runs (its newest run)
        model = make_model(make_tasks(), seed=7)
        init_from(model, InitFrom(path=str(path)))
        state = model.state_dict()
        assert all(torch.equal(state[k], best[k]) for k in best), path


def test_a_run_of_the_old_layout_resumes_and_moves_to_step_folders(tmp_path):
    """Run folders written before step folders (``last.safetensors`` + ``last.json``, the
    JSON being the checkpoint itself) still resume exactly; the next saves replace them."""
    ref = build(None)
    ref.fit()
    run = tmp_path / "run"
    run.mkdir()
    build(run, epochs=1).fit()
    ckpt = run / "checkpoints"
    for name in ("last", "best"):  # rewrite as the old layout
        step = ckpt / json.loads((ckpt / f"{name}.json").read_text())["dir"]
        meta = json.loads((step / "meta.json").read_text())
        (ckpt / f"{name}.safetensors").write_bytes((step / "model.safetensors").read_bytes())
        (ckpt / f"{name}.json").write_text(json.dumps(dict(meta, tensors_file=f"{name}.safetensors")))
    shutil.rmtree(step)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.json", "best.safetensors", "last.json",
                                                      "last.safetensors"]
    resumed = build(run)
    resumed.fit(resume_from=run)
    assert all(torch.equal(a, b) for a, b in zip(resumed.raw_model.state_dict().values(),
                                                 ref.raw_model.state_dict().values()))
    assert not list(ckpt.glob("*.safetensors")) and not leftovers(run)
