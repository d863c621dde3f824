"""Step time of the SegNet zoo on this machine: forward + backward, batch 2.

For each architecture and size (288x384 with the NYUv2 tasks, 128x256 with the CityScapes
tasks) it prints seconds per step, FLOPs (torch.utils.flop_counter.FlopCounterMode, counted
on the meta device, so free), achieved GFLOP/s, peak resident memory of the process that ran
the step, and the fp32 GEMM peak of this machine measured in the same run (torch.mm), with
ratios. Each configuration runs in its own subprocess so that peak RSS is its own.

    python bench/step_time.py            # full size (minutes on a 2-core CPU)
    python bench/step_time.py --quick    # 64x96 / 32x64, quarter width: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import statistics
import time

ARCHS = {
    # name: (attention, attention params, segnet params)
    "single-seg": ("split", {}, {}),  # one single-task SegNet (segmentation head only)
    "one-task": ("single", {}, {}),
    "stan": ("single", {"inner": "mtan"}, {}),
    "split-standard": ("split", {}, {}),
    "split-wide": ("split", {}, {"widths": [64, 128, 256, 512, 1024]}),
    "split-deep": ("split", {}, {"deep": True}),
    "dense": ("dense", {}, {}),
    "cross-stitch": ("cross_stitch", {}, {}),
    "mtan": ("mtan", {}, {}),
    "mtan-fast": ("mtan", {"fast": True, "channels_last": True}, {}),
    # activation-checkpointed attention branches: the same function in about half the memory
    "mtan-lean": ("mtan", {"memory_efficient": True, "channels_last": True}, {}),
}


from mtlkit.testing import StandInTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_description, gemm_peak, gpu_description  # noqa: E402


def tasks_for(height: int, only_seg: bool):
    if height >= 200:  # NYUv2
        tasks = {"segmentation": StandInTask("segmentation", "segmentation", 13, "log_softmax"),
                 "depth": StandInTask("depth", "depth", 1),
                 "normal": StandInTask("normal", "normal", 3, "l2_normalize")}
    else:  # CityScapes
        tasks = {"segmentation": StandInTask("segmentation", "segmentation", 7, "log_softmax"),
                 "depth": StandInTask("depth", "depth", 1)}
    return {"segmentation": tasks["segmentation"]} if only_seg else tasks


def build(arch: str, height: int, width_mult: float):
    from mtlkit.plugin_manager import get_registry

    reg = get_registry()
    attention, att_params, bb_params = ARCHS[arch]
    bb_params = dict(bb_params, width=width_mult)
    tasks = tasks_for(height, arch == "single-seg")
    heads = {t: (lambda c, t=t: reg.get("head", "dense_pred").build({}, in_channels=c, task=tasks[t])) for t in tasks}
    return reg.get("attention", attention).build(
        att_params, backbone=lambda: reg.get("backbone", "segnet").build(bb_params), heads=heads, tasks=tasks)


def loss_of(out):
    return sum(o.float().mean() for o in out.values())


def count_flops(arch, h, w, batch, width_mult):
    """The model's FLOPs per step, counted on the plain network for every variant that
    computes the same function: recomputation (memory_efficient) is not useful work, and
    torch's counter credits a grouped convolution's backward once per group (``fast`` would
    be credited about 8% more work than it does)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    attention, att_params, bb_params = ARCHS[arch]
    plain = {k: v for k, v in att_params.items() if k not in ("memory_efficient", "fast", "channels_last")}
    if plain != att_params:
        ARCHS["_math"] = (attention, plain, bb_params)
        arch = "_math"
    with torch.device("meta"):
        net = build(arch, h, width_mult)
        x = torch.randn(batch, 3, h, w)
        with FlopCounterMode(display=False) as fwd:
            out = net(x)
        with FlopCounterMode(display=False) as bwd:
            loss_of(out).backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def run_one(arch: str, h: int, w: int, batch: int, steps: int, width_mult: float,
            device: str = "cpu", amp: bool = False) -> dict:
    """One configuration (in a fresh process): the measured numbers as a dict.

    On CUDA, ``amp`` runs the step under bf16 autocast and the peak is the allocator's
    (torch.cuda.max_memory_allocated); on the CPU the peak is the process's resident size."""
    import contextlib

    import torch

    torch.manual_seed(0)
    fwd_flops, bwd_flops = count_flops(arch, h, w, batch, width_mult)
    dev = torch.device(device)
    net = build(arch, h, width_mult).train().to(dev)
    x = torch.randn(batch, 3, h, w, device=dev)
    params = sum(p.numel() for p in net.parameters())
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        net.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(net(x))
        loss.backward()
        sync()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
    if dev.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    import statistics

    return {"arch": arch, "size": f"{h}x{w}", "params": params, "step_s": statistics.median(times),
            "step_s_min": min(times), "step_s_max": max(times),
            "fwd_gflop_per_image": fwd_flops / batch / 1e9, "step_gflop": (fwd_flops + bwd_flops) / 1e9,
            "peak_rss_gb": peak_gb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and quarter width (seconds)")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of: " + ", ".join(ARCHS))
    ap.add_argument("--sizes", default=None, help="e.g. 288x384,128x256")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (the median is "
                    "reported, with the range)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA); GEMM peak then in bf16")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    width_mult = 0.25 if args.quick else 1.0
    if args._one:  # child process: one configuration, JSON on stdout
        arch, size = args._one.split("@")
        h, w = map(int, size.split("x"))
        print(json.dumps(run_one(arch, h, w, args.batch, args.steps, width_mult, args.device, args.amp)))
        return 0

    sizes = args.sizes or ("64x96,32x64" if args.quick else "288x384,128x256")
    archs = [a for a in args.archs.split(",") if a]
    n = 1024 if args.quick else (8192 if args.device == "cuda" else 2048)
    dtype = torch.bfloat16 if args.amp else torch.float32
    readings = [gemm_peak(n, device=args.device, dtype=dtype)]
    peak = readings[0]["median"]
    print(f"CPU: {cpu_description()}")
    if args.device == "cuda":
        print(f"GPU: {gpu_description()}")
    print(f"torch {torch.__version__}, {args.device}{' bf16 autocast' if args.amp else ''}, "
          f"{torch.get_num_threads()} threads; {'bf16' if args.amp else 'fp32'} GEMM peak "
          f"(torch.mm): {peak:.1f} GFLOP/s; batch {args.batch}; width x{width_mult}")
    rows = []
    for size in sizes.split(","):
        for arch in archs:
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", f"{arch}@{size}", "--batch", str(args.batch),
                   "--steps", str(args.steps), "--device", args.device] + (["--amp"] if args.amp else []) + \
                  (["--quick"] if args.quick else []) + \
                  (["--threads", str(args.threads)] if args.threads else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{arch} {size}: failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["gflops"] = row["step_gflop"] / row["step_s"]
            row["of_peak"] = row["gflops"] / peak
            rows.append(row)
            print(f"  done {arch} {size}: {row['step_s']:.2f} s", file=sys.stderr, flush=True)

    # the peak: the median of the readings taken before and after the rows (each itself a
    # median of 7), so one reading disturbed by a neighbour process does not set it
    readings.append(gemm_peak(n, device=args.device, dtype=dtype))
    peak = statistics.median([r["median"] for r in readings])
    for r in rows:
        r["of_peak"] = r["gflops"] / peak
    lo, hi = min(r["min"] for r in readings), max(r["max"] for r in readings)
    print(f"GEMM peak: {peak:.1f} GFLOP/s (median of medians before and after; single readings "
          f"{lo:.1f}-{hi:.1f})")
    header = (f"{'architecture':<15} {'size':>8} {'params':>12} {'fwd GF/img':>10} {'step GF':>8} "
              f"{'step s':>8} {'x base':>7} {'GFLOP/s':>8} {'of peak':>7} {'peak GB':>8}")
    print(header)
    print("-" * len(header))
    for size in sizes.split(","):
        size_rows = [r for r in rows if r["size"] == size]
        base = next((r for r in size_rows if r["arch"] == "split-standard"), size_rows[0] if size_rows else None)
        for r in size_rows:
            print(f"{r['arch']:<15} {r['size']:>8} {r['params']:>12,} {r['fwd_gflop_per_image']:>10.1f} "
                  f"{r['step_gflop']:>8.1f} {r['step_s']:>8.2f} {r['step_s'] / base['step_s']:>7.2f} "
                  f"{r['gflops']:>8.1f} {r['of_peak']:>7.2f} {r['peak_rss_gb']:>8.2f}")
    print("step s: median of the timed steps; x base: relative to split-standard (mtan variants: compare "
          "with the mtan row); of peak: achieved GFLOP/s / GEMM peak.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_description(), "gemm_peak_gflops": peak, "gemm_readings": readings,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
