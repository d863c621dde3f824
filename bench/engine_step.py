"""Step time of the quickstart recipe with the trainer before and after the engine split,
side by side in one run.

    python bench/engine_step.py                 # ~1-2 minutes on 2 CPU cores
    python bench/engine_step.py --steps 16 --rounds 5 --threads 2

Two workloads: the quickstart recipe (MTAN on SegNet at 1/8 width, 3 dense tasks, DWA,
Adam, 64x96 synthetic scenes, batch 8), and the engine tests' tiny model (2-task split
SmallCNN on 8x8 images, batch 4), whose step costs milliseconds, so that the loop's own
per-step work is a visible share of it. Three variants of the loop on each:

- ``before``: the monolithic ``mtlkit/engine/trainer.py`` of commit ``--before`` (default:
  the last one before the split), loaded from git into a temporary module that imports
  today's helpers. After every step it reads each task's loss back (``float``), captures
  the RNG states, and before every step it clones every buffer.
- ``after``: today's Trainer with ``log_interval = 10`` (the default): values stay on the
  device and are read once per interval; nothing is captured or cloned per step.
- ``after, log_interval=1``: today's Trainer reading back after every step; it isolates
  the cost of the read from the rest of the change.

Why the comparison is fair: every variant builds the same model from the same seed and
trains it with the same optimiser, weighting and settings on the same in-memory samples
(rendered once before timing, so the synthetic renderer is not in the loop), in the same
process with the same thread count, for the same number of steps; no evaluation and no
run folder (checkpoints are written per epoch, not per step). Each variant runs once
untimed first (allocator, oneDNN primitive caches; its host reads are counted then), then
the variants take turns for ``--rounds`` rounds (in alternating order), so a neighbour
process slowing the machine hits all of them alike; the tables give the median and the
range over rounds. Both workloads are one-to-many, whose seeds the split kept: ``before``
and ``after`` train on the same batches in the same order (and end with the same weights).

Step time is ``fit()`` wall time / steps for one epoch (the epoch's own overhead -- plan,
loader, mean losses -- included, as in training). Host reads per step count the calls
that bring a tensor's value to Python (``item``, ``tolist``, ``float()``, ``int()``,
``bool()``, ...) made by mtlkit's code: the engine's (each epoch also reads its shuffled
order once, a CPU tensor), and the rest's (the dense tasks' losses check whether a batch
has any valid target). On an accelerator each is a pipeline stall; on a CPU a read is
nearly free and the step is compute-bound, so there the before/after times should differ
by the loop's own bookkeeping only; that bookkeeping is also timed alone, in a tight loop,
where a busy machine blurs it less than whole steps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "c934890"  # the last commit with the monolithic trainer (before "Engine split by concern")


def cpu_description() -> str:
    """CPU model and the ISA flags that matter for fp32/bf16 kernels, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = {"avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
           "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags)}
    shown = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items()) if flags else "ISA flags unknown"
    return f"{model}, {os.cpu_count()} logical cores ({shown})"


def load_before(commit: str):
    """The Trainer class of ``commit``'s trainer.py, importing today's engine helpers."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:mtlkit/engine/trainer.py"],
                         capture_output=True, text=True, check=True).stdout
    name = f"mtlkit.engine._trainer_{commit}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mtlkit.engine"  # its relative imports resolve to today's modules
    # a file name inside mtlkit/ so that its reads count as mtlkit's (see count_reads)
    exec(compile(src, str(ROOT / "mtlkit" / "engine" / f"_trainer_{commit}.py"), "exec"), module.__dict__)
    sys.modules[name] = module
    return module.Trainer


@dataclass
class Workload:
    title: str
    make_parts: Callable[[], Any]  # a fresh model (same seed), tasks, weighting
    samples: list  # the training samples, made once
    training: dict
    optimizer: Any
    schedule: Any


def quickstart(steps: int, batch: int) -> Workload:
    """The quickstart recipe's model, tasks, weighting and settings; ``steps * batch``
    training samples rendered up front."""
    import mtlkit
    from mtlkit.build import build_parts

    recipe = mtlkit.load_recipe("quickstart", overrides=[f"data.params.num_train={steps * batch}",
                                                         f"training.batch_size={batch}"]).recipe
    data = build_parts(recipe).train_data
    return Workload(f"quickstart recipe (MTAN, SegNet 1/8 width, 3 tasks, 64x96), batch {batch}",
                    lambda: build_parts(recipe, with_data=False), [data[i] for i in range(len(data))],
                    recipe.training.model_dump(), recipe.optimizer, recipe.schedule)


def tiny(steps: int) -> Workload:
    """The engine tests' model (2-task split SmallCNN, 8x8 images, batch 4): a step costs
    milliseconds, so the loop's own per-step work shows."""
    import torch

    from mtlkit.build import build_tasks, compose
    from mtlkit.plugin_manager import get_registry

    spec = {t: ("classification", {"num_classes": 4, "target": t}) for t in ("shape", "colour")}

    def make_parts():
        torch.manual_seed(0)
        tasks = build_tasks(spec)
        model = compose(backbone=("small_cnn", {"widths": [4, 8]}), tasks=tasks, head="classifier")
        return SimpleNamespace(model=model, tasks=tasks, weighting=None)

    data = get_registry().get("dataset", "synthetic_classification").build(
        {"size": 8, "num_train": steps * 4, "num_val": 1}, split="train")
    return Workload("engine tests' model (split SmallCNN, 2 tasks, 8x8), batch 4", make_parts,
                    [data[i] for i in range(len(data))], {"batch_size": 4, "seed": 0}, {"name": "adam"}, None)


READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def count_reads() -> tuple[Counter, callable]:
    """Count tensor reads made from mtlkit's code, engine and the rest (tasks, model,
    weighting) apart; returns (counts, undo)."""
    import torch

    counts: Counter = Counter()
    ours, engine, saved = str(ROOT) + os.sep, str(ROOT / "mtlkit" / "engine") + os.sep, {}
    for name in READS:
        real = saved[name] = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, **kwargs):
            caller = os.path.realpath(sys._getframe(1).f_code.co_filename)
            if caller.startswith(ours):
                counts["engine" if caller.startswith(engine) else "other"] += 1
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, read)

    def undo():
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
    return counts, undo


def run(trainer_cls, w: Workload, steps: int, log_interval: int, count: bool = False):
    """Seconds per step of one epoch of ``steps`` steps, and (if ``count``) host reads per
    step as {"engine": ..., "other": ...}."""
    parts = w.make_parts()
    training = dict(w.training, epochs=1, max_steps_per_epoch=steps, device="cpu", num_workers=0,
                    log_interval=log_interval, best_metric=None)
    with contextlib.redirect_stdout(io.StringIO()):  # the progress lines
        trainer = trainer_cls(parts.model, parts.tasks, w.samples, None, weighting=parts.weighting,
                              optimizer=w.optimizer, schedule=w.schedule, training=training, quiet=True)
        counts, undo = count_reads() if count else (Counter(), lambda: None)
        try:
            t = time.perf_counter()
            trainer.fit()
            elapsed = time.perf_counter() - t
        finally:
            undo()
    return elapsed / steps, {k: counts[k] / steps for k in ("engine", "other")}


def bookkeeping_us(w: Workload, repeats: int = 300) -> float:
    """Microseconds of the per-step bookkeeping the ``before`` loop did, measured alone (so
    without the noise of whole steps): capture the RNG states, clone every buffer, read
    each task's loss."""
    import torch

    from mtlkit.engine.checkpoint import capture_rng

    parts = w.make_parts()
    buffers = list(parts.model.buffers())
    losses = [torch.rand(()) for _ in parts.tasks]
    best = float("inf")
    for _ in range(5):  # the best of a few batches: the least disturbed by other processes
        t = time.perf_counter()
        for _ in range(repeats):
            capture_rng()
            [b.detach().clone() for b in buffers]
            [float(v) for v in losses]
        best = min(best, (time.perf_counter() - t) / repeats)
    return 1e6 * best


def compare(variants: dict, w: Workload, steps: int, rounds: int) -> None:
    """Time every variant on ``w``, in turns, and print the table."""
    reads = {}
    for name, (cls, interval) in variants.items():  # warm-up (allocator, oneDNN primitives) + read counts
        reads[name] = run(cls, w, steps, interval, count=True)[1]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # no variant always first
        for name in order:
            cls, interval = variants[name]
            times[name].append(run(cls, w, steps, interval)[0])
    base = statistics.median(next(iter(times.values())))
    print(f"\n{w.title}: {steps} steps a run, {rounds} rounds\n")
    print("| variant | ms / step (median) | range over rounds | vs first | host reads / step: engine | "
          "tasks, model, weighting |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, r = statistics.median(ts), reads[name]
        print(f"| {name} | {1e3 * med:.2f} | {1e3 * min(ts):.2f}-{1e3 * max(ts):.2f} | {med / base:.3f} | "
              f"{r['engine']:.2f} | {r['other']:.2f} |", flush=True)
    us = bookkeeping_us(w)
    print(f"\nThe before loop's per-step bookkeeping alone (RNG capture, buffer clones, a float() per "
          f"loss): {us:.0f} us = {100 * us / (1e6 * base):.2f} % of its median step.", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per variant, taken in turns")
    ap.add_argument("--batch", type=int, default=8, help="batch size (the quickstart's: 8)")
    ap.add_argument("--tiny-steps", type=int, default=200, help="steps per timed run of the tiny model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine "
                    "OpenMP threads spin-waiting for a busy core slow small convolutions several-fold)")
    ap.add_argument("--before", default=BEFORE, help="commit whose trainer.py is 'before'")
    args = ap.parse_args(argv)

    import torch

    from mtlkit.engine import Trainer

    torch.set_num_threads(args.threads)
    variants = {}
    try:
        variants[f"before ({args.before}, reads every step)"] = (load_before(args.before), 10)
    except (subprocess.CalledProcessError, OSError, ImportError, SyntaxError, AttributeError) as exc:
        print(f"note: no 'before' variant (git show {args.before} failed: {str(exc).strip()[:120]})")
    variants["after (log_interval=10)"] = (Trainer, 10)
    variants["after, log_interval=1"] = (Trainer, 1)

    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    compare(variants, quickstart(args.steps, args.batch), args.steps, args.rounds)
    compare(variants, tiny(args.tiny_steps), args.tiny_steps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
