"""Where a training step's device time goes: torch.profiler over MTAN SegNet steps.

    python bench/gpu_profile.py --out DIR [--configs plain-fp32,plain-bf16,...] [--steps 3]
    python bench/gpu_profile.py --device cpu --height 32 --width 48 --width-mult 0.125  # smoke

For each configuration (network variant, precision, memory format) it runs warm-up steps
(cuDNN's autotuning), then profiles ``--steps`` training steps (forward, the summed loss,
backward, Adam) and prints, per step: the total device time of the profiled kernels, the
aten operators ranked by their own device time (the kernels each one launched, children
excluded) and the kernels ranked likewise, with the share of the total. The step's wall
time without the profiler (host clock around a synchronised step, median of 10) is printed
beside it: wall time well above device time means the host, not the device, bounds the step. Writes DIR/gpu_profile.json (every row) and DIR/gpu_profile.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_time import ARCHS, build as build_segnet_zoo, loss_of  # noqa: E402

ARCHS.setdefault("_fast", ("mtan", {"fast": True}, {}))  # batched branches, memory format from the config

# name: (step_time arch, precision, channels_last)
CONFIGS = {
    "plain-fp32": ("mtan", "fp32", False),
    "plain-bf16": ("mtan", "bf16", False),
    "fast-bf16": ("_fast", "bf16", False),
    "fast-bf16-cl": ("_fast", "bf16", True),
    "plain-bf16-cl": ("mtan", "bf16", True),
    "split-wide-bf16": ("split-wide", "bf16", False),
}


def device_time(evt, device: str) -> float:
    """An event's own time on ``device`` in microseconds (the attribute's name changed in torch 2.4)."""
    names = ("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)
    for name in names:
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def is_annotation(name: str) -> bool:
    """A profiler range on the device timeline (``record_function``: the optimiser's
    ``Optimizer.step#Adam.step``), not a kernel: it spans kernels that are counted already."""
    return "#" in name and " " not in name.split("#", 1)[0] or name.startswith("ProfilerStep")


def make_step(arch: str, precision: str, channels_last: bool, device: str, hw: tuple[int, int],
              width_mult: float, batch: int):
    torch.manual_seed(0)
    net = build_segnet_zoo(arch, hw[0], width_mult).train().to(device)
    x = torch.randn(batch, 3, *hw, device=device)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = net(x)
        loss_of(out).backward()
        opt.step()
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(step, device: str, n: int = 10) -> float:
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def profile_config(name: str, device: str, hw, width_mult: float, batch: int, steps: int, top: int) -> dict:
    arch, precision, cl = CONFIGS[name]
    step = make_step(arch, precision, cl, device, hw, width_mult, batch)
    for _ in range(3):
        step()
    ms = step_ms(step, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    # kernels: device-side events (none on a CPU); operators: CPU-side aten ops, charged with
    # their own kernels on CUDA, their own CPU time on a CPU
    kernels = [(e.key, device_time(e, device) / 1e3 / steps, e.count // steps) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e.key)]
    ops = [(e.key, device_time(e, device) / 1e3 / steps, e.count // steps) for e in events
           if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    total = sum(t for _, t, _ in kernels) if kernels else sum(t for _, t, _ in ops)
    rank = lambda rows: [{"name": k[:120], "ms": round(t, 3), "calls": c, "share": round(t / total, 4) if total else 0.0}
                         for k, t, c in sorted(rows, key=lambda r: -r[1])[:top]]
    return {"config": name, "arch": arch, "precision": precision, "channels_last": cl,
            "step_ms": round(ms, 3), "device_ms_per_step": round(total, 3),
            "ops": rank(ops), "kernels": rank(kernels)}


def markdown(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append(f"## {r['config']}: step {r['step_ms']} ms (no profiler), device time {r['device_ms_per_step']} ms/step\n")
        for what in ("ops", "kernels"):
            if r[what]:
                out.append(f"| {what} | ms/step | calls | share |\n|---|---|---|---|")
                out += [f"| `{e['name']}` | {e['ms']} | {e['calls']} | {100 * e['share']:.1f}% |" for e in r[what]]
                out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_profile_out"))
    p.add_argument("--configs", default="plain-fp32,plain-bf16,fast-bf16-cl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.configs.split(","):
        try:
            rows.append(profile_config(name, a.device, (a.height, a.width), a.width_mult, a.batch, a.steps, a.top))
        except Exception as e:  # a failed configuration must not cost the others
            rows.append({"config": name, "error": f"{type(e).__name__}: {e}"[:300], "ops": [], "kernels": [],
                         "step_ms": None, "device_ms_per_step": None})
        (a.out / "gpu_profile.json").write_text(json.dumps(rows, indent=1))
        (a.out / "gpu_profile.md").write_text(markdown(rows))
        print(markdown(rows[-1:]) if "error" not in rows[-1] else rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
