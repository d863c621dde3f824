"""CityScapes (the MTAN preprocessed release): segmentation and disparity at 128 x 256.

Layout: ``root/{train,val}/{image,label_7,label_19,depth}/{i}.npy``: image H x W x 3 float in
[0, 1]; labels H x W with -1 = ignore (void); depth is inverse depth (disparity, about
0..0.5) H x W or H x W x 1 with 0 = invalid. ``split="test"`` reads ``val`` unless a
``test`` folder exists.

``num_classes``: 19 reads ``label_19``, 7 reads ``label_7``, and 2 maps ``label_7`` to two
classes. The 7 classes are the Cityscapes categories without void:
0 flat, 1 construction, 2 object, 3 nature, 4 sky, 5 human, 6 vehicle (void = -1).
For 2 classes the release's own ``label_2`` folder is read when the split has one (the
MTAN authors' task-complexity study used their own 2-class labels). Otherwise ``label_7``
is mapped by mtlkit's own grouping - neither the paper nor the release documents one -
into **stuff** (class 0: flat, construction, nature, sky) and **things** (class 1: object,
human, vehicle); void stays -1. Note that Cityscapes' own ``labels.py`` marks only the
human and vehicle classes ``hasInstances``: runs on the mapping are not the paper's
2-class setting, and the 2-class numbers should say which labels they used.

Samples: ``image`` 3HW float32, ``segmentation`` HW int64, ``depth`` 1HW float32 (the
disparity, under the task name "depth"). Validation and augmentation as in
:mod:`mtlkit.plugins.datasets.nyuv2`, except that zooming in by s multiplies the disparity by
s (disparity is inverse depth, so an object s times closer has s times the disparity);
``reference_disparity_scaling=True`` divides by s as the reference code does.
"""

from __future__ import annotations

from typing import Literal

from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from mtlkit.fsprobe import is_dir
from mtlkit.hookspecs import hookimpl
from mtlkit.plugins.datasets.nyuv2 import DenseNpyDataset
from mtlkit.registry import Params

SEVEN_CLASS_NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
TWO_CLASS_NAMES = ("stuff", "things")
# Cityscapes' 19 evaluated classes in train-id order (label_19)
NINETEEN_CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                        "motorcycle", "bicycle")
# label_7 value -> 2-class value (index = 7-class id)
SEVEN_TO_TWO = np.array([0, 0, 1, 0, 0, 1, 1], dtype=np.int64)


class CityScapesParams(Params):
    root: str = Field(..., description="folder holding train/ and val/")
    num_classes: Literal[2, 7, 19] = 7
    targets: list[str] = Field(default_factory=lambda: ["segmentation", "depth"])
    augment: bool = False
    reference_disparity_scaling: bool = False
    limit: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in ("segmentation", "depth")]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from ['segmentation', 'depth']")
        if len(set(v)) != len(v):
            raise ValueError("targets listed twice")
        return v


class CityScapes(DenseNpyDataset):
    """CityScapes in the MTAN .npy layout (see the module docstring)."""

    name = "cityscapes"

    def __init__(self, params: CityScapesParams, split: str = "train") -> None:
        self.depth_scale_power = -1.0 if params.reference_disparity_scaling else 1.0
        self.folders = {"segmentation": "label_19" if params.num_classes == 19 else "label_7", "depth": "depth"}
        super().__init__(params, split)  # calls choose_folders once the split folder is known

    def choose_folders(self, split_dir: Path) -> None:
        """The label folder for ``num_classes``, chosen before the folders' files are checked."""
        # the release's own 2-class labels win over mtlkit's mapping (see the module docstring)
        self.release_two_class = self.num_classes == 2 and is_dir(split_dir / "label_2")
        if self.release_two_class:
            self.folders = {**self.folders, "segmentation": "label_2"}

    @property
    def class_names(self) -> list[str]:
        """Segmentation class names for ``num_classes`` (2, 7 or 19)."""
        return list({2: TWO_CLASS_NAMES, 7: SEVEN_CLASS_NAMES, 19: NINETEEN_CLASS_NAMES}[self.num_classes])

    def read_target(self, target: str, index: int, hw: tuple[int, int]) -> Tensor:
        if target == "segmentation" and self.release_two_class:
            return self.read_label("label_2", index, hw, num_classes=2)
        if target == "segmentation" and self.num_classes == 2:
            label = self.read_label("label_7", index, hw, num_classes=7)
            mapped = torch.from_numpy(SEVEN_TO_TWO)[label.clamp_min(0)]
            return torch.where(label < 0, label, mapped)
        return super().read_target(target, index, hw)


def build_cityscapes(params: CityScapesParams, split: str = "train") -> CityScapes:
    """CityScapes from root/{train,val}/{image,label_7,label_19,depth}/{i}.npy."""
    return CityScapes(params, split=split)


def tiny_cityscapes(root: Path) -> dict:
    """Write a two-scene copy of the release's layout under ``root``; the params that read it."""
    from .synthetic_scenes import write_cityscapes_layout

    write_cityscapes_layout(root, n_train=2, n_val=1, height=32, width=64)
    return {"root": str(root)}


@hookimpl
def register_datasets(register):
    register("cityscapes", build_cityscapes, params=CityScapesParams, tiny=tiny_cityscapes,
             description="CityScapes .npy release (2/7/19-class seg, disparity) at 128x256")


@hookimpl
def register_data_sources(register):
    from mtlkit.fetch import Archive

    register("cityscapes", [Archive(
        name="cityscapes", url="https://www.dropbox.com/s/lg2ktu7o8hzwf99/cityscapes2.zip?dl=1",
        filename="cityscapes2.zip", format="zip", places=(("train/image", "."),),
        note="the MTAN authors' 128x256 release, about 651 MB; no checksum published")],
        recipe="cityscapes/mtan", description="CityScapes as preprocessed by the MTAN authors, 128x256 "
        "(lorenmt/mtan README)")
