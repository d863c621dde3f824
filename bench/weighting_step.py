"""Step time of every registered weighting relative to Equal, side by side in one run.

    python bench/weighting_step.py                      # a few minutes on 2 CPU cores
    python bench/weighting_step.py --workloads quickstart --rounds 5 --steps 3
    python bench/weighting_step.py --half-size 96x128 --half-batch 4

Workloads (3 dense tasks: segmentation, depth, surface normals, on a batch of the built-in
synthetic scenes):

- ``quickstart``: MTAN on SegNet at 1/8 width, 64x96, batch 8 (the quickstart recipe);
- ``segnet-mtan-half``: MTAN on SegNet at half width, ``--half-size`` (default 32x64),
  batch ``--half-batch`` (default 2).

Variants: every registered weighting with its defaults (``params``), and again with
``grad_target = "features"`` where it supports it; methods that offer ``solver = "device"``
again with it (on CUDA: the step without its one read against the launches of the
fixed-iteration solver). Two reference variants: ``mgda``
with the step as it was before the step contract (the task-specific parameters' gradient
in a separate pass of ``combine(losses)``: ``old-extra-pass``), and ``mgda`` with the K
per-task passes batched into one (``torch.autograd.grad(..., is_grads_batched=True)``:
``batched``).

Fairness: one model per workload, shared by every variant (plain SGD with a tiny learning
rate, so no variant carries optimiser state and the weights barely move); one batch,
in memory; the same thread count. Each variant steps once untimed first, then the variants
take turns for ``--rounds`` rounds (the order reversed every other round), ``--steps``
steps each. Reported: each variant's best per-step time over rounds and its ratio to
Equal's best (on a machine shared with other processes the best is the least disturbed
estimate), and the median and range of its per-round ratio to Equal in the same round.
On a CPU shared with other processes, run with ``--threads 1``: several threads that
wait on each other slow down 10-20 fold when a neighbour holds a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_step import cpu_description  # noqa: E402


def make_workload(width: float, height: int, wide: int, batch: int):
    """(model, tasks, batch) of an MTAN SegNet on the synthetic scenes."""
    import torch
    from torch.utils.data import default_collate

    from mtlkit.plugin_manager import get_registry

    reg = get_registry()
    tasks = {"segmentation": reg.get("task", "segmentation").build({"num_classes": 7}, name="segmentation"),
             "depth": reg.get("task", "depth").build({}, name="depth"),
             "normal": reg.get("task", "normal").build({}, name="normal")}
    torch.manual_seed(0)
    heads = {t: (lambda c, t=t: reg.get("head", "dense_pred").build({}, in_channels=c, task=tasks[t])) for t in tasks}
    model = reg.get("attention", "mtan").build(
        {}, backbone=lambda: reg.get("backbone", "segnet").build({"width": width}), heads=heads, tasks=tasks)
    data = reg.get("dataset", "synthetic_scenes").build(
        {"height": height, "width": wide, "num_train": batch, "num_val": 1, "num_classes": 7}, split="train")
    return model.train(), tasks, default_collate([data[i] for i in range(batch)])


def variants(task_names: list[str]) -> list[tuple[str, Callable[[], Any], bool]]:
    """(label, weighting factory, batched passes) for every registered weighting and target."""
    from mtlkit.plugin_manager import get_registry

    reg = get_registry()
    out = []
    for name, comp in sorted(reg.components["weighting"].items()):
        settable = "grad_target" in comp.params.model_fields
        for target in getattr(comp.factory, "grad_targets", ("params",)):
            params = {"grad_target": target} if settable else {}
            out.append((f"{name} {target}", lambda c=comp, p=params: c.build(p, task_names=task_names), False))
            if "solver" in comp.params.model_fields:  # the no-read solver beside the exact one
                device = {**params, "solver": "device"}
                out.append((f"{name} {target} solver=device", lambda c=comp, p=device: c.build(p, task_names=task_names),
                            False))
    mgda = reg.get("weighting", "mgda")

    def old():
        w = mgda.build({}, task_names=task_names)
        w.__class__ = type("OldStepMGDA", (type(w),), {"backward": _old_backward})
        return w

    out.append(("mgda params old-extra-pass", old, False))
    out.append(("mgda params batched", lambda: mgda.build({}, task_names=task_names), True))
    out.append(("mgda features batched", lambda: mgda.build({"grad_target": "features"}, task_names=task_names),
                True))
    return out


def _old_backward(self, ctx):
    import torch

    G = ctx.task_gradients("params", retain_graph=True)
    ctx.set_gradient(self.combine_grads(G, ctx.global_losses()), "params")
    private = list(ctx.private_params)
    for p, g in zip(private, torch.autograd.grad(self.combine(ctx.losses), private, allow_unused=True)):
        p.grad = None if g is None else g.detach()


def measure(workload: str, model, tasks, batch, rounds: int, steps: int, only: set[str] | None,
            device: str = "cpu") -> list[dict]:
    import torch

    from mtlkit.engine import grad_step
    from mtlkit.engine.config import TrainingConfig
    from mtlkit.engine.distributed import DistContext
    from mtlkit.engine.step import TrainStep

    dev = torch.device(device)
    model.to(dev)
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = TrainingConfig(device="cuda" if dev.type == "cuda" else "cpu")
    runs = []
    for label, factory, batched in variants(list(tasks)):
        if only and label.split()[0] not in only and label.split()[0] != "equal":
            continue
        w = factory().to(dev)
        opt = torch.optim.SGD(list(model.parameters()) + list(w.parameters()), lr=1e-7)
        runs.append({"label": label, "batched": batched, "step": TrainStep(model, model, tasks, w, opt, cfg,
                                                                             DistContext(device=dev)), "times": []})

    def one(run) -> float:
        grad_step.BATCHED = run["batched"]
        try:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                run["step"](batch, None, 0, 0)
            sync()
            return (time.perf_counter() - t0) / steps
        finally:
            grad_step.BATCHED = False

    for run in runs:  # warm-up: allocator, oneDNN primitive caches
        one(run)
    for r in range(rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            run["times"].append(one(run))
    equal = next(run for run in runs if run["label"] == "equal params")
    rows = []
    for run in runs:
        ratios = [t / e for t, e in zip(run["times"], equal["times"])]
        rows.append({"workload": workload, "variant": run["label"], "best_s": min(run["times"]),
                     "ratio_best": min(run["times"]) / min(equal["times"]), "ratio": statistics.median(ratios),
                     "min_ratio": min(ratios), "max_ratio": max(ratios)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="quickstart,segnet-mtan-half")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--half-size", default="32x64", help="HxW of the half-width workload")
    ap.add_argument("--half-batch", type=int, default=2)
    ap.add_argument("--weightings", default="", help="comma-separated subset (equal is always measured)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.half_size.lower().split("x"))
    specs = {"quickstart": (0.125, 64, 96, 8), "segnet-mtan-half": (0.5, h, w, args.half_batch)}
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    only = {s for s in args.weightings.split(",") if s} or None
    for name in [s for s in args.workloads.split(",") if s]:
        width, hh, ww, b = specs[name]
        model, tasks, batch = make_workload(width, hh, ww, b)
        print(f"\n{name} on {args.device}: MTAN SegNet width {width}, {hh}x{ww}, batch {b}, K = {len(tasks)}; "
              f"{args.rounds} rounds x {args.steps} steps")
        rows = measure(name, model, tasks, batch, args.rounds, args.steps, only, args.device)
        print("| variant | best step (s) | x Equal (best) | x Equal (median per round) | range |\n"
              "|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['best_s']:.3f} | {r['ratio_best']:.2f} | {r['ratio']:.2f} | "
                  f"{r['min_ratio']:.2f}-{r['max_ratio']:.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
