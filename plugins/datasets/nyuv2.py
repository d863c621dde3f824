"""NYUv2 (the MTAN preprocessed release): 13-class segmentation, depth and surface normals.

Layout: ``root/{train,val}/{image,label,depth,normal}/{i}.npy`` for ``i = 0..N-1``:
image H x W x 3 float in [0, 1]; label H x W (integer values, stored as int or float),
``-1`` = ignore; depth H x W or H x W x 1 in metres, 0 = invalid; normal H x W x 3 in
[-1, 1], zero vector = invalid. The release has no test split: ``split="test"`` reads
``val`` unless a ``test`` folder exists.

Samples: ``image`` 3HW float32, ``segmentation`` HW int64, ``depth`` 1HW float32,
``normal`` 3HW float32; only the targets listed in ``targets`` are loaded.

Validation: when the data set is built, the folders, the one-to-one match of index files
(a missing ``label/7.npy`` next to ``image/7.npy``, or an extra ``label/9.npy``, is reported
then) and, from the .npy headers only, that all images are H x W x 3 floats of one size.
As each sample is loaded: shapes, dtypes and values (images in [0, 1], finite in float32,
labels in [-1, C), depth >= 0, normals of unit length or the zero vector). Every problem is
a :class:`~mtlkit.errors.DataError` naming the file or folder (see :mod:`._npy_checks`).

Augmentation (``augment=True``, meant for training), as in the MTAN facts: a scale s drawn
from {1.0, 1.2, 1.5}; a random int(H/s) x int(W/s) window resized back to H x W (bilinear,
align_corners=True, for image and normals; nearest for labels and depth); depth divided by
s (zooming in by s looks like being s times closer); then a horizontal flip with p = 0.5,
which negates the normals' x component. Normals are not renormalised after bilinear
resizing, as in the reference. Randomness: with ``seed=None`` the global torch RNG (seeded
per DataLoader worker and epoch by torch); with an integer ``seed``, sample ``i`` in epoch
``e`` (see :meth:`DenseNpyDataset.set_epoch`) gets the same augmentation on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.errors import DataError
from mtlkit.fsprobe import is_dir
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from ._npy_checks import check_image_headers, check_unit_normals, list_indices, load_npy, to_float32

SCALES = (1.0, 1.2, 1.5)
# The 13-class NYUv2 labels (class 0 "void" of the 13-class release is -1 here), in label order.
THIRTEEN_CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                        "table", "tv", "wall", "window")


class NYUv2Params(Params):
    root: str = Field(..., description="folder holding train/ and val/")
    targets: list[str] = Field(default_factory=lambda: ["segmentation", "depth", "normal"],
                               description="which targets samples carry")
    augment: bool = False
    limit: int | None = Field(None, ge=1, description="use only the first `limit` samples")
    num_classes: int = Field(13, ge=2)
    seed: int | None = Field(None, ge=0, description="None: global torch RNG; int: per-sample, per-epoch seeded augmentation")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        known = ("segmentation", "depth", "normal")
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from {list(known)}")
        if len(set(v)) != len(v):
            raise ValueError("targets listed twice")
        return v


class DenseNpyDataset(Dataset):
    """Shared loader for the one-to-many .npy releases (NYUv2, CityScapes).

    Subclasses set ``folders`` (target -> sub-folder) and may override ``read_target``.
    """

    folders: ClassVar[dict[str, str]] = {}
    name: ClassVar[str] = "dataset"
    depth_scale_power: ClassVar[float] = -1.0  # depth *= s ** power after zooming in by s

    def __init__(self, params: Any, split: str = "train") -> None:
        self.params = params
        self.split = split
        self.targets = list(params.targets)
        self.sample_keys = ["image", *self.targets]  # read by the checks before training
        self.num_classes = params.num_classes
        self.epoch = 0
        root = Path(params.root).expanduser()
        if not is_dir(root):
            kinds = ",".join(["image", *(self.folders[t] for t in self.targets)])
            layout = f"{{train,val}}/{{{kinds}}}/{{i}}.npy"
            raise DataError(f"{self.name}: root folder '{root}' does not exist (expected {root}/{layout})")
        split_dir = root / split
        if split == "test" and not is_dir(split_dir):
            split_dir = root / "val"  # the releases ship no test split; papers report val
        if not is_dir(split_dir):
            raise DataError(f"{self.name}: split folder '{split_dir}' does not exist")
        self.split_dir = split_dir
        self.choose_folders(split_dir)
        image_dir = split_dir / "image"
        if not is_dir(image_dir):
            raise DataError(f"{self.name}: folder '{image_dir}' does not exist")
        indices = list_indices(image_dir)
        if not indices:
            raise DataError(f"{self.name}: '{image_dir}' holds no {{i}}.npy files (empty split)")
        n = max(indices) + 1
        missing = sorted(set(range(n)) - indices)
        if missing:
            raise DataError(f"{self.name}: '{image_dir / f'{missing[0]}.npy'}' is missing (indices must run 0..{n - 1})")
        for target in self.targets:
            folder = split_dir / self.folders[target]
            if not is_dir(folder):
                raise DataError(f"{self.name}: folder '{folder}' (target '{target}') does not exist")
            found = list_indices(folder)
            absent = sorted(set(range(n)) - found)
            if absent:
                raise DataError(
                    f"{self.name}: '{folder / f'{absent[0]}.npy'}' is missing (image/{absent[0]}.npy exists)"
                )
            extra = sorted(found - indices)
            if extra:
                raise DataError(f"{self.name}: '{folder / f'{extra[0]}.npy'}' has no image/{extra[0]}.npy "
                                f"(folder '{folder}' holds {len(extra)} extra file(s); image/ holds 0..{n - 1})")
        check_image_headers([image_dir / f"{i}.npy" for i in range(n)])
        self.length = n if params.limit is None else min(n, params.limit)

    def choose_folders(self, split_dir: Path) -> None:
        """Hook: set ``self.folders`` from what ``split_dir`` holds (before the folders are checked)."""

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """With an integer ``seed``, augmentation depends on (seed, epoch, index) only."""
        self.epoch = int(epoch)

    # -- reading and checking one sample ---------------------------------------------------
    def path(self, folder: str, index: int) -> Path:
        return self.split_dir / folder / f"{index}.npy"

    def read_image(self, index: int) -> Tensor:
        path = self.path("image", index)
        a = load_npy(path)
        if a.ndim != 3 or a.shape[2] != 3:
            raise DataError(f"{path}: image must be H x W x 3, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: image must be float in [0, 1], got dtype {a.dtype}")
        a = to_float32(a, path, "image")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = " (stored as 0..255? divide by 255)" if hi > 2 else ""
            raise DataError(f"{path}: image must be float in [0, 1], found values in [{lo:.4g}, {hi:.4g}]{hint}")
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def read_label(self, folder: str, index: int, hw: tuple[int, int], num_classes: int | None = None) -> Tensor:
        path = self.path(folder, index)
        c = self.num_classes if num_classes is None else num_classes
        a = load_npy(path)
        if a.shape != hw:
            raise DataError(f"{path}: label must be H x W = {hw}, got shape {a.shape}")
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or (a != np.round(a)).any():
                raise DataError(f"{path}: label holds non-integer values")
        elif not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: label must hold integers, got dtype {a.dtype}")
        lo, hi = a.min(), a.max()  # checked before the cast: huge values would wrap in int64
        if lo < -1 or hi >= c:
            raise DataError(f"{path}: label values must lie in [-1, {c}), found [{lo:g}, {hi:g}]")
        return torch.from_numpy(a.astype(np.int64))

    def read_depth(self, folder: str, index: int, hw: tuple[int, int]) -> Tensor:
        path = self.path(folder, index)
        a = load_npy(path)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        if a.shape != hw:
            raise DataError(f"{path}: depth must be H x W (or H x W x 1) with H x W = {hw}, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: depth must be float, got dtype {a.dtype}")
        a = to_float32(a, path, "depth")
        if (a < 0).any():
            raise DataError(f"{path}: depth holds negative values (use 0 for invalid)")
        return torch.from_numpy(np.ascontiguousarray(a))[None]

    def read_normal(self, folder: str, index: int, hw: tuple[int, int]) -> Tensor:
        path = self.path(folder, index)
        a = load_npy(path)
        if a.shape != (*hw, 3):
            raise DataError(f"{path}: normal must be H x W x 3 with H x W = {hw}, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: normal must be float, got dtype {a.dtype}")
        a = to_float32(a, path, "normal")
        if np.abs(a).max() > 1.0 + 1e-3:
            raise DataError(f"{path}: normal holds components outside [-1, 1]")
        check_unit_normals(a, path)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def read_target(self, target: str, index: int, hw: tuple[int, int]) -> Tensor:
        folder = self.folders[target]
        if target == "segmentation":
            return self.read_label(folder, index, hw)
        if target == "depth":
            return self.read_depth(folder, index, hw)
        return self.read_normal(folder, index, hw)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample = {"image": self.read_image(index)}
        hw = tuple(sample["image"].shape[1:])
        for target in self.targets:
            sample[target] = self.read_target(target, index, hw)
        if self.params.augment:
            sample = augment(sample, self._generator(index), self.depth_scale_power)
        return sample

    def _generator(self, index: int) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        seq = np.random.SeedSequence([self.params.seed, self.epoch, index])
        return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))


def augment(sample: dict[str, Tensor], generator: torch.Generator | None = None,
            depth_scale_power: float = -1.0) -> dict[str, Tensor]:
    """Random scale-crop then horizontal flip (see the module docstring).

    ``depth_scale_power``: depth is multiplied by ``s ** depth_scale_power`` (-1 for metric
    depth; +1 is geometrically right for disparity).
    """
    image = sample["image"]
    h, w = image.shape[-2:]
    s = SCALES[int(torch.randint(len(SCALES), (), generator=generator))]
    ch, cw = int(h / s), int(w / s)
    top = int(torch.randint(h - ch + 1, (), generator=generator))
    left = int(torch.randint(w - cw + 1, (), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = {}
    for key, x in sample.items():
        crop = x[..., top:top + ch, left:left + cw]
        if key in ("image", "normal"):
            y = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=True)[0]
        elif key == "segmentation":
            # nearest keeps labels (and -1) exact; interpolate needs floats
            y = F.interpolate(crop[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        elif key == "depth":
            y = F.interpolate(crop[None], size=(h, w), mode="nearest")[0] * (s ** depth_scale_power)
        else:
            y = x
        if flip:
            y = y.flip(-1)
            if key == "normal":
                y = y.clone()
                y[0] = -y[0]
        out[key] = y
    return out


class NYUv2(DenseNpyDataset):
    """NYUv2 in the MTAN .npy layout (see the module docstring)."""

    name = "nyuv2"
    folders = {"segmentation": "label", "depth": "depth", "normal": "normal"}

    @property
    def class_names(self) -> list[str]:
        """Segmentation class names (``class i`` beyond the 13 named classes)."""
        return [THIRTEEN_CLASS_NAMES[i] if self.num_classes == 13 else f"class {i}" for i in range(self.num_classes)]


def build_nyuv2(params: NYUv2Params, split: str = "train") -> NYUv2:
    """NYUv2 from root/{train,val}/{image,label,depth,normal}/{i}.npy."""
    return NYUv2(params, split=split)


def tiny_nyuv2(root: Path) -> dict:
    """Write a two-scene copy of the release's layout under ``root``; the params that read it."""
    from .synthetic_scenes import write_nyuv2_layout

    write_nyuv2_layout(root, n_train=2, n_val=1, height=32, width=32)
    return {"root": str(root)}


@hookimpl
def register_datasets(register):
    register("nyuv2", build_nyuv2, params=NYUv2Params, tiny=tiny_nyuv2,
             description="NYUv2 .npy release (13-class seg, depth, normals); optional MTAN augmentation")


@hookimpl
def register_data_sources(register):
    from mtlkit.fetch import Archive

    register("nyuv2", [Archive(
        name="nyuv2", url="https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip?dl=1", filename="nyuv2.zip",
        format="zip", places=(("train/image", "."),),
        note="the MTAN authors' preprocessed release, 288x384; no size or checksum published")],
        recipe="nyuv2/mtan", description="NYUv2 as preprocessed by the MTAN authors (lorenmt/mtan README)")
