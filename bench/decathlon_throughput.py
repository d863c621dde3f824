"""Visual Decathlon throughput: training images/s of WRN-28-4 MTAN at 72x72, the GFLOP/s
that achieves against this run's fp32 GEMM peak, and data loading images/s from JPEG files.

    python bench/decathlon_throughput.py            # batch 128 (the paper's)
    python bench/decathlon_throughput.py --quick    # batch 16, fewer steps and images

Every number comes from this one run on this machine, so the ratios compare like with like:

- training: SGD steps (Nesterov, lr 0.1, momentum 0.9, wd 5e-5, the facts' settings), each
  on the next domain in turn, as many-to-many training does; images/s = batch * steps / time;
- GFLOP/s: forward + backward FLOPs of one step (torch.utils.flop_counter.FlopCounterMode)
  divided by the measured step time; the peak is the best of several large fp32 torch.mm;
- data: ``write_decathlon_layout`` writes synthetic JPEGs into a temporary folder, then a
  ``DataLoader`` over the ``decathlon`` data set (train split: decode, random crop, flip,
  normalise) is timed with num_workers 0 and 2; the ratio to training says whether loading
  can keep up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from mtlkit.plugins.decathlon.domains import DOMAINS
from mtlkit.plugin_manager import get_plugin_manager, get_registry


def build_model(attention: str, domains: dict[str, int], backbone_params: dict):
    registry = get_registry()
    if attention not in registry.names("attention"):
        err = get_plugin_manager().failed_plugins.get(f"mtlkit.plugins.attention.{attention}", "not registered")
        print(f"note: attention '{attention}' unavailable ({err}); using 'split'", file=sys.stderr)
        attention = "split"
    names = list(domains)
    tasks = {d: registry.get("task", "classification").build({"num_classes": n}, name=d) for d, n in domains.items()}
    head = registry.get("head", "classifier")
    heads = {d: (lambda c, t=tasks[d]: head.build({}, in_channels=c, task=t)) for d in names}
    wrn = registry.get("backbone", "wrn")
    net = registry.get("attention", attention).build(
        {}, backbone=lambda: wrn.build(backbone_params, task_names=names), heads=heads, tasks=tasks)
    return attention, net, tasks


def gemm_peak(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def train_throughput(net, tasks, batch: int, steps: int, size: int):
    names = list(tasks)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    x = torch.randn(batch, 3, size, size)
    labels = {d: torch.randint(t.out_channels, (batch,)) for d, t in tasks.items()}
    net.train()

    def step(i: int) -> None:
        d = names[i % len(names)]
        out = net(x, tasks=[d])
        loss = tasks[d].loss(out[d], labels[d])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm up (allocations, first-call overheads)
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    t = time.perf_counter()
    for i in range(steps):
        step(i + 2)
    elapsed = time.perf_counter() - t
    return batch * steps / elapsed, elapsed / steps, flops


def loader_throughput(root: Path, domain: str, batch: int, workers: int) -> float:
    ds = get_registry().get("dataset", "decathlon").build({"root": str(root), "domain": domain}, split="train")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=False, drop_last=False)
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 timed steps, fewer images")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=72)
    ap.add_argument("--attention", default="mtan")
    ap.add_argument("--images", type=int, default=None, help="JPEG images written for the loading test")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.quick else 128)
    steps = args.steps or (3 if args.quick else 5)
    n_images = args.images or (256 if args.quick else 1024)
    torch.manual_seed(0)

    attention, net, tasks = build_model(args.attention, dict(DOMAINS), {})
    n_params = sum(p.numel() for p in net.parameters())
    img_s, step_s, flops = train_throughput(net, tasks, batch, steps, args.size)
    achieved = flops / step_s / 1e9
    peak = gemm_peak(1024 if args.quick else 2048, 5)

    from mtlkit.plugins.decathlon.synthetic import write_decathlon_layout

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "decathlon"
        t = time.perf_counter()
        write_decathlon_layout(root, n_images, 1, 1, image_size=72, domains=["cifar100"])
        write_s = n_images / (time.perf_counter() - t)
        data = {w: loader_throughput(root, "cifar100", batch, w) for w in (0, 2)}

    print(f"Visual Decathlon throughput  (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, batch {batch}, {args.size}x{args.size})")
    print(f"model: WRN-28-4 + {attention}, 10 domains, {n_params:,} parameters; "
          f"{flops / batch / 1e9:.3f} GFLOP per image (forward + backward)")
    rows = [
        ("training (1 domain / step)", f"{img_s:9.1f} img/s", f"{step_s:7.3f} s/step", ""),
        ("achieved compute", f"{achieved:9.1f} GFLOP/s", "", f"{achieved / peak:.2f} x GEMM peak"),
        ("fp32 GEMM peak (torch.mm)", f"{peak:9.1f} GFLOP/s", "", "1.00"),
        ("writing synthetic JPEGs", f"{write_s:9.1f} img/s", "", ""),
        ("loading, num_workers=0", f"{data[0]:9.1f} img/s", "", f"{data[0] / img_s:.1f} x training"),
        ("loading, num_workers=2", f"{data[2]:9.1f} img/s", "", f"{data[2] / img_s:.1f} x training"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'rate':>17}  {'time':>14}  ratio")
    for name, rate, tm, ratio in rows:
        print(f"{name:<{w}}  {rate:>17}  {tm:>14}  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
