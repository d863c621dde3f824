"""Measuring per-domain mean/std under a Decathlon data root (write them with
:func:`mtlkit.plugins.decathlon.stats.write_stats`)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from mtlkit.errors import DataError

from .dataset import DecathlonDataset, DecathlonParams
from .domains import DOMAINS


def compute_mean_std(
    root: str | os.PathLike,
    domains: Iterable[str] | None = None,
    layout: str = "official",
    split: str = "train",
    image_size: int = 72,
    max_images: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean/std of each domain's images (scaled to [0, 1], after the loader's
    resize and centre crop) under a Decathlon data root; the result has the stats file's
    ``domains`` form."""
    out: dict[str, dict[str, list[float]]] = {}
    for domain in list(domains) if domains is not None else list(DOMAINS):
        params = DecathlonParams(root=str(root), domain=domain, layout=layout, image_size=image_size,
                                 crop=image_size, augment=False, normalize=False)
        ds = DecathlonDataset(params, split=split)
        n = len(ds) if max_images is None else min(len(ds), max_images)
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        pixels = 0
        for i in range(n):
            img = ds[i]["image"].double()
            total += img.sum(dim=(1, 2))
            total_sq += (img * img).sum(dim=(1, 2))
            pixels += img.shape[1] * img.shape[2]
        if pixels == 0:
            raise DataError(f"{root}: domain '{domain}' has no {split} images to compute statistics from")
        mean = total / pixels
        std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
        out[domain] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
        flat = [c for c, v in zip("RGB", out[domain]["std"]) if not v > 0]
        if flat:  # a stats file refuses std 0: say here which images cause it
            raise DataError(f"{root}: domain '{domain}': the {split} images do not vary in channel {flat[0]} "
                            "(std 0), so they cannot be normalised by it")
    return out
