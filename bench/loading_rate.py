"""The Decathlon loading row of bench/gpu_bench.py: images per second through the data set's
DataLoader, apart from the training rows (it measures the host, not the card)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch


def loading_rows(images: int = 2048, device: str = "cuda") -> list[dict]:
    """The decathlon data set's train split (JPEG decode, crop, flip, normalise) through a
    pinned DataLoader at batch 128 onto ``device``, in steady state: one untimed pass starts the
    (persistent) workers and warms the page cache, the second is timed. With 0 workers, the
    engine's default, and on CUDA also one worker per CPU but one (is the default's cap of 8
    what holds it back?)."""
    from torch.utils.data import DataLoader

    from mtlkit.engine.precision import loader_workers
    from mtlkit.plugin_manager import get_registry
    from mtlkit.plugins.decathlon.synthetic import write_decathlon_layout

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "decathlon"
        write_decathlon_layout(root, images, 1, 1, image_size=72, domains=["cifar100"])
        ds = get_registry().get("dataset", "decathlon").build({"root": str(root), "domain": "cifar100"},
                                                              split="train")
        on_cuda = torch.device(device).type == "cuda"
        counts = {0, loader_workers(None, torch.device(device))}
        if on_cuda:
            counts.add(max(1, len(os.sched_getaffinity(0)) - 1))
        for workers in sorted(counts):
            loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, pin_memory=on_cuda,
                                persistent_workers=workers > 0)
            for timed_pass in (False, True):
                t, n = time.perf_counter(), 0
                for b in loader:
                    b["image"].to(device, non_blocking=True)
                    n += b["image"].shape[0]
                if on_cuda:
                    torch.cuda.synchronize()
            rows.append({"workers": workers, "images": n, "images_per_s": n / (time.perf_counter() - t)})
            del loader  # its workers end
    return rows
