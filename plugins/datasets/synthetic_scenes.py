"""Procedural indoor scenes with segmentation, depth and normals (embedded, no download).

Each sample is a room (floor, walls, ceiling, pictures) with 3-8 boxes, spheres and
cylinders, ray cast from a pinhole camera by :mod:`.scenes_render` (see it for the
classes, the camera frame and the intrinsics). The three targets are geometrically
consistent: ``depth`` is z-depth in metres and ``normal`` the unit surface normal in the
camera frame (x right, y down, z forward), so normals estimated from the back-projected
depth map agree with ``normal`` on planar surfaces.

``num_classes`` is 2 or at least 7. With 2, labels are 0 = room structure (floor, wall,
ceiling, picture) and 1 = object: the 13-class scene of the same seed, coarsened (see
:mod:`.scenes_render`), so 2 / 7 / 13 classes give a task-complexity ladder like the
paper's 2 / 7 / 19 CityScapes classes.

Samples match the NYUv2 loader: ``image`` 3HW float32 in [0, 1], ``segmentation`` HW int64,
``depth`` 1HW float32, ``normal`` 3HW float32. Sample ``i`` of split ``s`` is rendered on the
fly from the seed words ``(seed, split id, i)``, so it is the same in every worker and on
every machine, and needs no storage.

Speed (one process on one core of the 2-core CPU, numpy float64 ray casting, 13 classes,
images per CPU-second): about 5 images/s at 288 x 384 and about 200 images/s at 64 x 80
(measured with the machine shared, load ~7; an idle run of an earlier, unchunked version
gave 7.7 and 190 images/s wall-clock).
Use DataLoader workers, or :func:`write_nyuv2_layout` once, for full-size training.

:func:`write_nyuv2_layout` and :func:`write_cityscapes_layout` save rendered scenes as .npy
files in the real releases' layouts (for testing the real loaders, or as stand-ins);
``mtlkit data synth-scenes`` is their command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import Dataset

from mtlkit.atomic import atomic_folder

from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from .scenes_render import NUM_STUFF, SHAPES, render

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
TARGETS = ("segmentation", "depth", "normal")


class SyntheticScenesParams(Params):
    height: int = Field(288, ge=8)
    width: int = Field(384, ge=8)
    num_train: int = Field(795, ge=1)
    num_val: int = Field(654, ge=1)
    num_classes: int = Field(13, ge=2, description="4 room classes + object classes (shape x colour family); "
                             "or 2: room structure (floor, wall, ceiling, picture) vs objects")
    seed: int = Field(0, ge=0)
    noise: float = Field(0.02, ge=0.0, description="std of Gaussian pixel noise")
    targets: list[str] = Field(default_factory=lambda: list(TARGETS))

    @field_validator("num_classes")
    @classmethod
    def _known_class_count(cls, v: int) -> int:
        if 2 < v < 7:
            raise ValueError(f"num_classes must be 2 (structure vs objects) or at least 7, got {v}")
        return v

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from {list(TARGETS)}")
        return v


def render_sample(seed: int, split: str, index: int, height: int, width: int, num_classes: int,
                  noise: float) -> dict[str, np.ndarray]:
    """The raw HWC arrays (plus ``K``) of one sample."""
    return render([seed, SPLIT_IDS.get(split, 3), index], height, width, num_classes, noise)


class SyntheticScenes(Dataset):
    """Rendered on the fly; deterministic per (seed, split, index)."""

    def __init__(self, params: SyntheticScenesParams, split: str = "train") -> None:
        self.params = params
        self.split = split
        self.length = params.num_train if split == "train" else params.num_val
        self.targets = list(params.targets)
        self.sample_keys = ["image", *self.targets]  # read by the checks before training
        self.num_classes = params.num_classes

    def __len__(self) -> int:
        return self.length

    @property
    def class_names(self) -> list[str]:
        """Segmentation class names: the room's four, then each object's shape and colour family."""
        if self.num_classes == 2:
            return ["structure", "object"]
        room = ["floor", "wall", "ceiling", "picture"]
        return room + [f"{SHAPES[j % 3]} {j // 3 + 1}" for j in range(self.num_classes - NUM_STUFF)]

    def raw(self, index: int) -> dict[str, np.ndarray]:
        p = self.params
        return render_sample(p.seed, self.split, index, p.height, p.width, p.num_classes, p.noise)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        r = self.raw(index)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(r["image"].transpose(2, 0, 1)))}
        if "segmentation" in self.targets:
            sample["segmentation"] = torch.from_numpy(r["label"])
        if "depth" in self.targets:
            sample["depth"] = torch.from_numpy(r["depth"])[None]
        if "normal" in self.targets:
            sample["normal"] = torch.from_numpy(np.ascontiguousarray(r["normal"].transpose(2, 0, 1)))
        return sample


# -- writing the real layouts ---------------------------------------------------------------
def _save(folder: Path, index: int, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{index}.npy", array, allow_pickle=False)


def write_nyuv2_layout(out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 4, height: int = 288,
                       width: int = 384, num_classes: int = 13, seed: int = 0, noise: float = 0.02) -> Path:
    """Render scenes into ``out_dir/{train,val}/{image,label,depth,normal}/{i}.npy``.

    image H x W x 3 float32, label H x W int64, depth H x W x 1 float32 (metres), normal
    H x W x 3 float32. Sample ``i`` of a split equals ``synthetic_scenes`` sample ``i`` with
    the same seed, size, num_classes and noise.
    """
    def fill(tmp: Path) -> None:
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                r = render_sample(seed, split, i, height, width, num_classes, noise)
                _save(tmp / split / "image", i, r["image"])
                _save(tmp / split / "label", i, r["label"])
                _save(tmp / split / "depth", i, r["depth"][..., None])
                _save(tmp / split / "normal", i, r["normal"])

    return atomic_folder(out_dir, fill)


# 19 scene classes (4 room + 15 objects = 3 shapes x 5 colour families) -> CityScapes 7:
# floor -> flat, wall -> construction, ceiling -> sky, picture -> object,
# box -> vehicle, sphere -> nature, cylinder -> human. label_7 is thus a coarsening of
# label_19, as in the real release.
CITYSCAPES_CLASSES = 19
_ROOM_TO_7 = [0, 1, 4, 2]
_SHAPE_TO_7 = [6, 3, 5]
SCENE19_TO_7 = np.array(_ROOM_TO_7 + [_SHAPE_TO_7[j % 3] for j in range(CITYSCAPES_CLASSES - NUM_STUFF)],
                        dtype=np.int64)
DISPARITY_SCALE = 0.25  # disparity = 0.25 / z: z >= 0.5 m gives <= 0.5, as in the release's range


def write_cityscapes_layout(out_dir: str | os.PathLike, n_train: int = 8, n_val: int = 4, height: int = 128,
                            width: int = 256, seed: int = 0, noise: float = 0.02) -> Path:
    """Render scenes into ``out_dir/{train,val}/{image,label_7,label_19,depth}/{i}.npy``.

    label_19 is the scene class (num_classes 19), label_7 its coarsening ``SCENE19_TO_7``,
    depth the disparity ``DISPARITY_SCALE / z`` (H x W x 1 float32; every pixel valid).
    """
    def fill(tmp: Path) -> None:
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                r = render_sample(seed, split, i, height, width, CITYSCAPES_CLASSES, noise)
                _save(tmp / split / "image", i, r["image"])
                _save(tmp / split / "label_19", i, r["label"])
                _save(tmp / split / "label_7", i, SCENE19_TO_7[r["label"]])
                _save(tmp / split / "depth", i, (DISPARITY_SCALE / r["depth"])[..., None].astype(np.float32))

    return atomic_folder(out_dir, fill)


@hookimpl
def register_datasets(register):
    register("synthetic_scenes", SyntheticScenes, params=SyntheticScenesParams,
             description="Ray-cast indoor rooms: segmentation, z-depth, camera-frame normals (embedded)")


# -- mtlkit data synth-scenes -----------------------------------------------------------------
MAX_SIDE = 4096


def _configure_synth_scenes(p) -> None:
    from mtlkit.argtypes import int_range, new_folder, non_negative_int, positive_int

    p.add_argument("out", type=new_folder, help="folder to create (new or empty)")
    p.add_argument("--n", type=positive_int, default=200, help="training images")
    p.add_argument("--n-val", type=positive_int, default=None, help="validation images (default: n/4)")
    p.add_argument("--height", type=int_range(8, MAX_SIDE), default=None,
                   help="image height (default: 288 for nyuv2, 128 for cityscapes)")
    p.add_argument("--width", type=int_range(8, MAX_SIDE), default=None,
                   help="image width (default: 384 for nyuv2, 256 for cityscapes)")
    p.add_argument("--num-classes", type=_class_count, default=None,
                   help="segmentation classes, 2 or at least 7 (nyuv2 layout; default 13)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--layout", choices=["nyuv2", "cityscapes"], default="nyuv2")


def _class_count(text: str) -> int:
    import argparse

    from mtlkit.argtypes import int_range

    value = int_range(2, 1000)(text)
    if value < 7 and value != 2:
        raise argparse.ArgumentTypeError(f"must be 2 (structure vs objects) or at least 7, got {value}")
    return value


def synth_scenes_command(args) -> int:
    from mtlkit.errors import ConfigError, DataError, os_reason

    n_val = args.n_val if args.n_val is not None else max(1, args.n // 4)
    classes = args.num_classes
    if args.layout == "cityscapes" and classes is not None:
        raise ConfigError(f"--num-classes {classes}: the cityscapes layout always has {CITYSCAPES_CLASSES} classes "
                          "(and their 7-class coarsening)")
    nyu = args.layout == "nyuv2"
    h = args.height if args.height is not None else 288 if nyu else 128
    w = args.width if args.width is not None else 384 if nyu else 256
    try:
        if nyu:
            write_nyuv2_layout(args.out, args.n, n_val, height=h, width=w,
                               num_classes=13 if classes is None else classes, seed=args.seed)
        else:
            write_cityscapes_layout(args.out, args.n, n_val, height=h, width=w, seed=args.seed)
    except OSError as exc:
        raise DataError(f"{args.out}: cannot write the output folder ({os_reason(exc)})") from None
    print(f"wrote {args.n} train + {n_val} val scenes ({h}x{w}, {args.layout} layout) to {args.out}")
    return 0


@hookimpl
def register_commands(register):
    register("synth-scenes", synth_scenes_command, configure=_configure_synth_scenes, group="data",
             help="synthetic indoor scenes in the NYUv2 (or CityScapes) layout")
