"""GPU training-step benchmark, every row measured side by side in one process on one card.

    python bench/gpu_bench.py --out DIR [--budget 330] [--steps 20] [--first N] [--warm]

Rows (training steps: forward, loss, backward, Adam step):
- MTAN on SegNet, NYUv2 shapes (13-class segmentation, depth, normals), 288x384, batch 2:
  the plain per-task loop (the authors' computation: fp32, NCHW), ``fast`` (batched
  branches), ``memory_efficient`` (recomputed levels), each in fp32 and bf16 autocast,
  eager and under torch.compile (default mode, and reduce-overhead: the step replayed as
  CUDA graphs), and fast + channels-last + bf16.
- mtlkit's own training step of the NYUv2 MTAN recipe (recipes/nyuv2/mtan.toml: task
  losses, equal weighting, Adam) on the same shapes, eager and with ``training.cuda_graph``
  (the whole step replayed as one CUDA graph), in fp32 and bf16; with the recipe's
  overrides of ``ENGINE``: batched branches (fast), channels-last, and torch.compile
  (inductor) whose kernels are captured in the step's graph.
- Split, Wide on SegNet at the same shapes, fp32 / bf16, eager / compiled.
- Visual Decathlon: WRN-28-4 + MTAN, 10 domains, 72x72, batch 128, one domain per step:
  training images/s in fp32 and in bf16 + channels-last.
- Data loading (bench/loading_rate.py): decathlon JPEGs through the data set's DataLoader,
  images/s in steady state with 0 workers, the engine's CUDA default and one per CPU but one.

Step time is the median of ``--steps`` steps timed with CUDA events after 3 warm-up steps
(compilation and cuDNN's autotuning happen in the warm-up). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients, optimiser state,
activations); the warm-up's peak, which holds the autotuner's trial workspaces, is kept apart.
TFLOP/s counts the useful FLOPs of the plain network (torch.utils.flop_counter on the meta
device; the same function for every variant), against the card's bf16 dense GEMM peak
measured in the same run (8192^3 torch.mm). Rows run in the order of ``PLAN`` (the most
telling first; bench/gpu_plan.py), and a row whose expected seconds would end it after
``--budget`` seconds is skipped (and listed as skipped), so the script ends in time.
Results: DIR/gpu_bench.json and DIR/gpu_bench.md, written after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_plan import (CORE, ENGINE, EXPECTED_SECONDS, PLAN, compiles, expected_seconds,  # noqa: E402
                      row_key)
from gpu_report import markdown, write_report  # noqa: E402
from loading_rate import loading_rows  # noqa: E402
from machine import cpu_description, gemm_peak, gpu_description  # noqa: E402
from step_time import build as build_segnet_zoo, count_flops  # noqa: E402

H, W, BATCH = 288, 384, 2


# --gpu-lock: rows measured by several processes at once (bench/gpu_rows.sh) compile side by
# side on the host's CPUs and take turns on the card for their timed steps
GPU_LOCK: Path | None = None


@contextlib.contextmanager
def card_to_itself():
    """The timed steps alone on the card: an exclusive lock on GPU_LOCK (none when unset)."""
    if GPU_LOCK is None:
        yield
        return
    import fcntl

    with open(GPU_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def timed(step, steps: int, warmup: int) -> dict:
    """Median and range (ms, CUDA events) of ``steps`` calls of ``step(i)`` after ``warmup``
    untimed ones; peak memory (GB) over the timed calls, and over the warm-up apart (it holds
    cuDNN's autotuning workspaces, a graph's capture). ``step`` returns its loss tensors."""
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()  # steady state from here
    warm_peak = torch.cuda.max_memory_allocated(dev) / 1e9
    times = []
    with card_to_itself():
        torch.cuda.reset_peak_memory_stats(dev)
        for i in range(warmup, warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses = step(i)
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in times]
    return {"ms": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
            "peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9, "peak_gb_warmup": warm_peak,
            "loss_finite": all(bool(torch.isfinite(v)) for v in losses)}


def time_steps(net, make_batch, loss_fn, precision: str, steps: int, warmup: int = 3,
               channels_last: bool = False, domains: list[str] | None = None, graphs: bool = False,
               device: str = "cuda") -> dict:
    """Median step time (ms) and peak memory (GB) of ``steps`` training steps of ``net``."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    x, target = make_batch()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(i: int) -> list:
        domain = domains[i % len(domains)] if domains else None
        if graphs:  # CUDA graphs (reduce-overhead): a new step may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = net(x, tasks=[domain]) if domain else net(x)
        loss = loss_fn(out, target, domain)
        loss.backward()
        opt.step()
        return [loss]

    return timed(step, steps, warmup)


def dense_loss(out, target, domain):
    return sum(o.float().mean() for o in out.values())


def segnet_row(arch: str, precision: str, compiled: str | None, steps: int, channels_last: bool = False) -> dict:
    """``compiled``: None (eager), "default" or "reduce-overhead" (torch.compile mode)."""
    torch.manual_seed(0)
    net = build_segnet_zoo(arch, H, 1.0).train().cuda()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        net = torch.compile(net, mode=None if compiled == "default" else compiled)
    batch = lambda: (torch.randn(BATCH, 3, H, W, device="cuda"), None)  # noqa: E731
    return time_steps(net, batch, dense_loss, precision, steps, channels_last=channels_last,
                      graphs=compiled == "reduce-overhead")


def engine_row(arch: str, precision: str, graph: bool, steps: int) -> dict:
    """The shipped MTAN recipe's own training step (mtlkit's TrainStep: the task losses,
    the weighting, Adam) with ``ENGINE[arch]``'s overrides, ``training.cuda_graph`` on or off,
    on one fixed synthetic batch."""
    import mtlkit
    from mtlkit.engine.graph_step import WARMUP

    overrides = {"training.device": "cuda", "training.precision": precision,
                 "training.cuda_graph": "on" if graph else "off", **ENGINE[arch]}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = mtlkit.build_trainer("nyuv2/mtan", synthetic=True, run_dir=Path(tmp) / "run",
                                       overrides=overrides).trainer
        batch = torch.utils.data.default_collate([trainer.train_data[i] for i in range(BATCH)])
        batch = {k: v.pin_memory() for k, v in batch.items()}
        trainer.raw_model.train()
        # warm-up: the eager steps, the capture, one replay
        row = timed(lambda i: trainer.train_step(batch, None, 0, i)[0].values(), steps, WARMUP + 2)
        return {**row, "replays": getattr(trainer.train_step, "replays", 0)}


def decathlon_row(precision: str, channels_last: bool, steps: int, batch: int = 128, device: str = "cuda") -> dict:
    """WRN-28-4 MTAN over the ten domains, one domain per step in turn, 72x72 (the facts')."""
    from decathlon_throughput import build_model  # noqa: E402
    from mtlkit.plugins.decathlon.domains import DOMAINS

    torch.manual_seed(0)
    _, net, tasks = build_model("mtan", dict(DOMAINS), {})
    net = net.train().to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    labels = {d: torch.randint(t.out_channels, (batch,), device=device) for d, t in tasks.items()}

    def loss(out, target, domain):
        return tasks[domain].loss(out[domain].float(), labels[domain])

    images = lambda: (torch.randn(batch, 3, 72, 72, device=device), None)  # noqa: E731
    row = time_steps(net, images, loss, precision, steps, channels_last=channels_last, domains=list(tasks),
                     device=device)
    row["images_per_s"] = batch / (row["ms"] / 1e3)
    return row


def measure(row: tuple, steps: int) -> dict:
    """One PLAN row's figures (``timed``'s dict)."""
    _, arch, _, prec, comp, cl = row
    torch._dynamo.reset()
    if arch.startswith("engine"):
        return engine_row(arch, prec, comp == "cuda-graph", steps)
    return segnet_row(arch, prec, comp, steps, cl)


def warm(plan: list[tuple], out: Path) -> None:
    """Compile each compiled row once (one timed step after its warm-up), so that inductor's
    on-disk caches hold its kernels when the timed run comes; bench/gpu_check.sh runs this
    beside the gpu tests, whose time goes to compiling on the host CPUs, not to the card.
    OUT/gpu_bench_warm.json lists the rows warmed so far."""
    from mtlkit.atomic import atomic_write_json

    done = []
    for row in filter(compiles, plan):
        t = time.perf_counter()
        try:
            measure(row, steps=1)
            done.append(row_key(row))
            atomic_write_json(out / "gpu_bench_warm.json", done)
            print(f"warmed in {time.perf_counter() - t:.0f} s: {row}", flush=True)
        except Exception as exc:  # the timed run reports it
            print(f"warming failed: {row}: {type(exc).__name__}: {exc}", flush=True)
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds to end by: a row starts only if its expected seconds fit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", choices=["eager", "compiled", "all"], default="all",
                    help="compiled: append the torch.compile rows to DIR/gpu_bench.json of an eager run")
    ap.add_argument("--core", action="store_true", help="only MTAN plain fp32/bf16, fast bf16 and Split Wide")
    ap.add_argument("--first", type=int, help="only the first N rows of PLAN")
    ap.add_argument("--warm", action="store_true", help="only compile the compiled rows once (see warm())")
    ap.add_argument("--only", type=lambda v: [int(i) for i in v.split(",")],
                    help="only these rows of PLAN (0-based, comma-separated), whatever the budget; no peak "
                         "readings (bench/gpu_rows.sh: one process a row, merged by gpu_report.py --merge)")
    ap.add_argument("--gpu-lock", type=Path, help="a file to lock while the timed steps run (see card_to_itself)")
    ap.add_argument("--memory-fraction", type=float,
                    help="this process's share of the card's memory (torch.cuda.set_per_process_memory_fraction): "
                         "processes side by side, each with cuDNN's autotuner trying workspaces of tens of GB, "
                         "filled an H200 without it")
    args = ap.parse_args(argv)
    if args.memory_fraction and torch.cuda.is_available():  # (without CUDA each row reports the lack)
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    global GPU_LOCK
    GPU_LOCK = args.gpu_lock
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    plan = [p for p in PLAN if args.rows == "all" or (p[4] is None) == (args.rows == "eager")]
    if args.core or args.first:
        plan = [p for p in plan if p in PLAN[:args.first or CORE]]
    if args.only:
        plan = [PLAN[i] for i in args.only]
    from step_time import ARCHS

    ARCHS["_fast"] = ("mtan", {"fast": True}, {})
    ARCHS["_lean"] = ("mtan", {"memory_efficient": True}, {})
    if args.warm:  # the same backend settings as the timed run: part of inductor's cache keys
        torch.backends.cuda.matmul.allow_tf32 = False
        warm(plan, out)
        return 0
    if args.rows == "compiled" and (out / "gpu_bench.json").exists():
        res = json.loads((out / "gpu_bench.json").read_text())
    else:
        res = {"gpu": gpu_description(), "torch": torch.__version__, "cpu": cpu_description(), "rows": [],
               "bf16_gemm_tflops": float("nan"), "fp32_gemm_tflops": float("nan")}
        if not args.only:  # --only: the peaks come from the run these rows are merged into
            res["bf16_gemm_tflops"] = gemm_peak(8192, 5, "cuda", torch.bfloat16)["median"] / 1e3
            torch.backends.cuda.matmul.allow_tf32 = False
            res["fp32_gemm_tflops"] = gemm_peak(8192, 3, "cuda", torch.float32)["median"] / 1e3
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32 (cuDNN convs: torch's default)
    warm_file = out / "gpu_bench_warm.json"
    warmed = set(json.loads(warm_file.read_text())) if warm_file.exists() else set()

    def fits(seconds: float) -> bool:
        return time.perf_counter() - t0 + seconds <= args.budget

    flops = {m: sum(count_flops(m, H, W, BATCH, 1.0)) / 1e12 for m in ("mtan", "split-wide")}
    for p in plan:
        model, _, variant, prec, comp, cl = p
        row = {"model": model, "variant": variant, "precision": prec, "compile": comp, "channels_last": cl,
               "tflop_per_step": flops["mtan" if model.startswith("MTAN") else "split-wide"],
               "baseline": variant == "plain" and prec == "fp32" and comp is None}
        if compiles(p):
            row["cache_warmed"] = row_key(p) in warmed
        if args.memory_fraction:
            row["memory_fraction"] = args.memory_fraction
        if not args.only and not fits(expected_seconds(p, warmed)):
            row["error"] = "skipped (time budget)"
        else:
            try:
                row.update(measure(p, args.steps))
            except Exception as exc:  # one failing row must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_report(out, res)
        if not (args.core or args.only) and comp is None and (model, variant, prec) == ("Split Wide SegNet", "plain", "bf16"):
            if not fits(EXPECTED_SECONDS["decathlon"]):
                res["decathlon"] = [{"variant": "all", "error": "skipped (time budget)"}]
                continue
            res["decathlon"] = []
            for prec2, cl2, name in (("fp32", False, "fp32 NCHW"), ("bf16", True, "bf16 + channels-last")):
                try:
                    d = decathlon_row(prec2, cl2, args.steps)
                except Exception as exc:
                    d = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                d["variant"] = name
                res["decathlon"].append(d)
                print(json.dumps(d), flush=True)
                write_report(out, res)
                torch.cuda.empty_cache()
            try:
                res["loading"] = loading_rows()
            except Exception as exc:
                res["loading_error"] = f"{type(exc).__name__}: {exc}"
            write_report(out, res)
    res.setdefault("seconds", {})[args.rows] = time.perf_counter() - t0
    write_report(out, res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
