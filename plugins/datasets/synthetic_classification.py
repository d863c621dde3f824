"""Generated images with several label sets on the same images (tests and quick starts).

Each image shows one coloured shape on a textured background; the labels are its shape,
its colour and its size bucket, so one-to-many classification has K related tasks.
Deterministic: sample ``i`` of a seed is the same on every machine and in every worker.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch.utils.data import Dataset

from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1],
                        [0.8, 0.1, 0.8], [0.1, 0.8, 0.8], [0.95, 0.5, 0.1], [0.5, 0.5, 0.5]])
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "grey")
SHAPE_NAMES = ("disc", "square", "horizontal bar", "vertical bar")
NUM_SHAPES = len(SHAPE_NAMES)


class SyntheticClassificationParams(Params):
    size: int = Field(32, ge=8, description="image side in pixels")
    num_train: int = Field(512, ge=1)
    num_val: int = Field(128, ge=1)
    num_colours: int = Field(4, ge=2, le=len(COLOURS))
    num_sizes: int = Field(3, ge=2, le=4)
    noise: float = Field(0.1, ge=0.0)
    seed: int = Field(0, ge=0)


class SyntheticClassification(Dataset):
    """Targets: ``shape`` (4 classes), ``colour`` (num_colours), ``size`` (num_sizes)."""

    def __init__(self, params: SyntheticClassificationParams, split: str = "train") -> None:
        self.params = params
        self.split = split
        self.length = params.num_train if split == "train" else params.num_val
        self.split_offset = {"train": 0, "val": 1, "test": 2}.get(split, 3)
        self.num_classes = {"shape": NUM_SHAPES, "colour": params.num_colours, "size": params.num_sizes}

    def __len__(self) -> int:
        return self.length

    @property
    def class_names(self) -> dict[str, list[str]]:
        """Class names per target (size buckets from the smallest)."""
        p = self.params
        return {"shape": list(SHAPE_NAMES), "colour": list(COLOUR_NAMES[:p.num_colours]),
                "size": [f"size {i + 1} of {p.num_sizes}" for i in range(p.num_sizes)]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        p = self.params
        g = torch.Generator().manual_seed(p.seed * 1_000_003 + self.split_offset * 10_000_019 + index)
        shape = int(torch.randint(NUM_SHAPES, (), generator=g))
        colour = int(torch.randint(p.num_colours, (), generator=g))
        size_cls = int(torch.randint(p.num_sizes, (), generator=g))
        s = p.size
        radius = s * (0.15 + 0.25 * (size_cls + 0.5) / p.num_sizes) / 2 * 1.6
        cy, cx = (torch.rand(2, generator=g) * (s - 2 * radius) + radius).tolist()
        yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
        if shape == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        elif shape == 1:
            mask = ((yy - cy).abs() <= radius * 0.85) & ((xx - cx).abs() <= radius * 0.85)
        elif shape == 2:
            mask = ((yy - cy).abs() <= radius * 0.35) & ((xx - cx).abs() <= radius)
        else:
            mask = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius * 0.35)
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        background = 0.35 + 0.1 * torch.sin(xx * 0.7 + yy * 0.3 + phase)
        image = background.expand(3, s, s).clone()
        image[:, mask] = COLOURS[colour][:, None]
        image = image + p.noise * torch.randn(3, s, s, generator=g)
        return {
            "image": image.clamp(0, 1),
            "shape": torch.tensor(shape),
            "colour": torch.tensor(colour),
            "size": torch.tensor(size_cls),
        }


@hookimpl
def register_datasets(register):
    register("synthetic_classification", SyntheticClassification, params=SyntheticClassificationParams, tiny={"size": 8, "num_train": 4, "num_val": 4},
             description="Generated shapes with shape/colour/size labels (embedded, no download)")
