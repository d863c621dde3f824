"""A generated stand-in for the Visual Decathlon: ten domains, no download.

Each domain takes a real Decathlon name but has far fewer classes (2..20) and its own
image statistics, so that many-to-many code paths (domain BN, per-domain heads, the
score, submissions) run end to end on a laptop. Every domain is learnable: its class is a
visible, augmentation-safe cue (no class depends on left/right, since 7 domains train with
horizontal flips):

============== ======= =====================================================================
domain         classes what decides the class
============== ======= =====================================================================
aircraft       12      a vertical plane silhouette: wing position (3) x span (2) x tail (2)
cifar100       20      shape (disc, square, triangle, ring) x colour (5) on a noisy backdrop
daimlerpedcls  2       grey: a pedestrian figure (head, torso, legs) or clutter boxes
dtd            8       texture type (stripes h/v, checks, dots, rings, hatch, blobs, zigzag)
gtsrb          6       traffic-sign shape and colour (no flip)
imagenet12     16      object shape (4) x fill pattern (4) among clutter
omniglot       20      a fixed 3-stroke glyph per class, black on white (no flip)
svhn           10      a seven-segment digit in random colours (no flip)
ucf101         5       how many blobs (1..5)
vgg-flowers    12      petal count (3..8) x centre colour (2)
============== ======= =====================================================================

Sample ``i`` of (seed, domain, split) is the same on every machine and in every worker;
its class is ``i % classes`` (balanced splits). :func:`write_decathlon_layout` writes the
official release layout (JPEG + COCO-style annotations with offset category ids) for
end-to-end tests of the ``decathlon`` loader; the ``synthetic_decathlon`` data set
generates the same images in memory (float images in [0, 1], not normalised).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from mtlkit.errors import DataError
from mtlkit.hookspecs import hookimpl
from mtlkit.atomic import atomic_folder
from mtlkit.registry import Params

from ._painters import GENERATORS, SYNTHETIC_CLASSES, _Canvas
from .domains import DOMAINS, DomainName, category_offset, check_domain

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def generate(domain: str, split: str, index: int, size: int = 72, seed: int = 0) -> tuple[np.ndarray, int]:
    """Sample ``index`` of a domain's split: (HWC uint8 image, class)."""
    check_domain(domain, where="synthetic_decathlon", error=DataError)
    num_classes, fn = GENERATORS[domain]
    cls = index % num_classes
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain), SPLIT_INDEX[split], index])
    img = fn(rng, cls, _Canvas(size))
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), cls


# --------------------------------------------------------------------------- writer
def write_decathlon_layout(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 72,
    seed: int = 0,
    domains: list[str] | None = None,
    quality: int = 95,
) -> dict[str, dict[str, int]]:
    """Write the official release layout for the synthetic domains: ``data/<domain>/<split>/
    NNNNNNN.jpg`` and ``annotations/<domain>_{train,val}.json``, ``<domain>_test_stripped.json``
    (COCO style, official category offsets, unique image ids). Written into a temporary
    folder next to ``out_dir`` and renamed into place; a non-empty ``out_dir`` is refused.
    Returns {domain: {"num_classes", "category_offset"}}."""
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder; refusing to write the decathlon layout there")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: output folder exists and is not empty; refusing to write the decathlon layout there")
    if not 1 <= image_size <= 4096:
        raise DataError(f"write_decathlon_layout: image_size must be from 1 to 4096, got {image_size}")
    if seed < 0:
        raise DataError(f"write_decathlon_layout: seed must be 0 or more, got {seed}")
    names = list(domains) if domains is not None else list(DOMAINS)
    for d in names:
        check_domain(d, where="write_decathlon_layout", error=DataError)
    for n, what in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        if n < 0:
            raise DataError(f"write_decathlon_layout: {what} must be >= 0, got {n}")
    summary: dict[str, dict[str, int]] = {}

    def fill(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        for d in names:
            num_classes = SYNTHETIC_CLASSES[d]
            offset = category_offset(d)
            categories = [{"id": offset + c, "name": f"{d}_class{c:02d}"} for c in range(num_classes)]
            base_id = (list(DOMAINS).index(d) + 1) * 10**7
            counter = 0
            for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
                folder = tmp / "data" / d / split
                folder.mkdir(parents=True)
                images, annotations = [], []
                for i in range(n):
                    counter += 1
                    arr, cls = generate(d, split, i, image_size, seed)
                    rel = f"data/{d}/{split}/{counter:07d}.jpg"
                    Image.fromarray(arr).save(tmp / rel, format="JPEG", quality=quality)
                    image_id = base_id + counter
                    images.append({"id": image_id, "file_name": rel, "width": image_size, "height": image_size})
                    if split != "test":
                        annotations.append({"id": image_id, "image_id": image_id, "category_id": offset + cls})
                name = f"{d}_test_stripped.json" if split == "test" else f"{d}_{split}.json"
                body: dict[str, Any] = {"images": images, "categories": categories}
                if split != "test":
                    body["annotations"] = annotations
                (tmp / "annotations" / name).write_text(json.dumps(body))
            summary[d] = {"num_classes": num_classes, "category_offset": offset}

    atomic_folder(out, fill)
    return summary


# --------------------------------------------------------------------------- in-memory data set
class SyntheticDecathlonParams(Params):
    domain: DomainName = Field(..., description="one of the ten Decathlon domain names")
    size: int = Field(72, ge=16, description="image side in pixels")
    n: int = Field(256, ge=1, description="images per split")
    seed: int = Field(0, ge=0)


class SyntheticDecathlon(Dataset):
    """One generated domain's split (``train+val``: the train images, then the val images);
    samples like the ``decathlon`` data set's."""

    def __init__(self, params: SyntheticDecathlonParams, split: str = "train") -> None:
        if split not in SPLIT_INDEX and split != "train+val":
            raise DataError(f"synthetic_decathlon: unknown split '{split}' (splits: train, val, test, train+val)")
        self.params = params
        self.split = split
        self.parts = split.split("+")  # train+val: the train images, then the val images
        self.domain = params.domain
        self.num_classes = SYNTHETIC_CLASSES[params.domain]
        self.category_offset = category_offset(params.domain)
        self.base_id = (list(DOMAINS).index(params.domain) + 1) * 10**7

    def __len__(self) -> int:
        return self.params.n * len(self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        split, index = self.parts[index // self.params.n], index % self.params.n
        arr, cls = generate(self.domain, split, index, self.params.size, self.params.seed)
        image = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        image_id = self.base_id + SPLIT_INDEX[split] * 10**6 + index + 1
        return {"image": image, "label": torch.tensor(cls, dtype=torch.long), "image_id": image_id}


@hookimpl
def register_datasets(register):
    register("synthetic_decathlon", SyntheticDecathlon, params=SyntheticDecathlonParams, tiny={"domain": "svhn", "size": 16, "n": 4},
             description="Ten generated Decathlon-like domains (2..20 classes, no download)")
