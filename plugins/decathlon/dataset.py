"""Visual Decathlon: one domain's split, from the official release or an ImageFolder copy.

Layouts (``layout``):

- ``"official"``: ``root/data/<domain>/{train,val,test}/*.jpg`` and COCO-style
  ``root/annotations/<domain>_{train,val}.json`` / ``<domain>_test_stripped.json``. File
  names in the JSON are taken relative to ``root`` (or ``root/data`` if that is where they
  resolve). Category ids are offset per domain; the file's smallest id must be the domain's
  official offset (else it is another domain's file) and is subtracted. Parsing and its
  checks live in :mod:`.annotations`.
- ``"imagefolder"``: ``root/<domain>/<split>/<class>/*.jpg``. Classes are the train split's
  class folders (sorted numerically if all names are integers, else by name) so that every
  split shares one class order; a test split may be flat (no class folders, no labels).
  Image ids are positions in the sorted file list: they are not the test server's ids,
  so a submission needs the official layout.

Preprocessing (``augmentation``, see :mod:`.geometry`): every image is decoded once to
RGB with its short side resized to ``image_size`` (72, the release's size); the network
sees a ``crop`` x ``crop`` input. ``"padded_square"`` (the default, mtlkit's original
behaviour) centre-crops a square when decoding, then trains on a random crop after
``pad`` pixels of zero padding (4) and flips, except in gtsrb, omniglot and svhn.
``"reference"`` (the reference implementation, used by the shipped Decathlon recipes)
keeps the aspect ratio, trains on a random crop without padding plus a flip, and does not
augment gtsrb, omniglot and svhn at all. Evaluation takes the centre crop. The MTAN
WRN-28-4 facts give a 72x72 input (72 -> 36 -> 18 -> 9), hence ``crop = 72``; the
residual-adapter setting's 64x64 input is ``crop = 64``.
Normalisation uses the per-domain mean/std of ``decathlon_stats.json`` (the reference
implementation's values, shipped as data), or of ``stats_file`` (for a new domain:
:func:`mtlkit.plugins.decathlon.mean_std.compute_mean_std`).

Splits: ``train``, ``val``, ``test``, and ``train+val`` (both labelled splits as one
training set, augmented as the train split: the reference's test-server protocol).

Samples: ``{"image": 3HW float, "label": long (-1 for the unlabelled test split),
"image_id": int}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from mtlkit.errors import DataError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from mtlkit.fsprobe import is_dir

from .annotations import entries, read_official_index
from .domains import DOMAINS, DomainName, category_offset
from .geometry import augments, centre_crop, decode_image, fit_image, flips, random_crop
from .stats import load_stats

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test", "train+val")


class DecathlonParams(Params):
    root: str = Field(..., description="the release root (holding data/ and annotations/) or the ImageFolder root")
    domain: DomainName = Field(..., description="one of the ten Decathlon domains")
    layout: Literal["official", "imagefolder"] = "official"
    image_size: int = Field(72, ge=8, description="short side after resizing (padded_square: then centre-cropped to a square)")
    crop: int = Field(72, ge=8, description="network input side")
    augmentation: Literal["padded_square", "reference"] = Field(
        "padded_square", description="padded_square: square image, padded random crop + flip; reference: "
        "the reference's unpadded random crop + flip, none for gtsrb/omniglot/svhn")
    pad: int = Field(4, ge=0, description="zero padding before the training random crop (padded_square only)")
    augment: bool = Field(True, description="random crop + flip on the train split")
    normalize: bool = True
    stats_file: str | None = Field(None, description="per-domain mean/std JSON replacing the shipped one")
    cache: bool = Field(False, description="keep decoded uint8 images in memory (per worker)")
    check_files: bool = Field(True, description="check at start that every listed image exists")

    @model_validator(mode="after")
    def _crop_fits(self) -> "DecathlonParams":
        if self.augmentation == "reference":
            # the reference crops without padding: a pad asked for here would be silently dropped
            if "pad" in self.model_fields_set and self.pad:
                raise ValueError("pad: the reference augmentation crops without padding (set pad = 0 or leave it out)")
            if self.crop > self.image_size:
                raise ValueError(f"crop ({self.crop}) must be at most image_size ({self.image_size})")
        elif self.crop > self.image_size + 2 * self.pad:
            raise ValueError(f"crop ({self.crop}) must be at most image_size + 2 * pad ({self.image_size + 2 * self.pad})")
        return self


def _sorted_names(names: list[str]) -> list[str]:
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in entries(folder, folders=False) if p.suffix.lower() in IMAGE_SUFFIXES)


def read_imagefolder_index(root: Path, domain: str, split: str) -> dict[str, Any]:
    folder = root / domain / split
    if not is_dir(folder):
        raise DataError(f"{folder}: split folder does not exist (ImageFolder layout root/<domain>/<split>/<class>/)")
    class_ref = root / domain / "train"
    if not is_dir(class_ref):
        class_ref = folder
    classes = _sorted_names([p.name for p in entries(class_ref, folders=True)])
    if len(classes) > DOMAINS[domain]:
        raise DataError(f"{class_ref}: {len(classes)} class folders, more than domain '{domain}' has ({DOMAINS[domain]})")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    subdirs = _sorted_names([p.name for p in entries(folder, folders=True)])
    if subdirs:
        for name in subdirs:
            if name not in index:
                raise DataError(f"{folder / name}: class folder not among the train split's classes")
            for p in _image_files(folder / name):
                paths.append(p)
                labels.append(index[name])
    else:
        if split != "test":
            raise DataError(f"{folder}: no class folders (only a test split may be unlabelled)")
        paths = _image_files(folder)
        labels = [-1] * len(paths)
    if not paths:
        raise DataError(f"{folder}: the {split} split holds no images")
    return {"paths": paths, "labels": labels, "ids": list(range(len(paths))), "offset": category_offset(domain),
            "num_classes": len(classes) or DOMAINS[domain], "class_names": classes, "source": folder}


class DecathlonDataset(Dataset):
    """One Visual Decathlon domain's split (see the module docstring)."""

    def __init__(self, params: DecathlonParams, split: str = "train") -> None:
        if split not in SPLITS:
            raise DataError(f"decathlon: unknown split '{split}' (splits: {', '.join(SPLITS)})")
        root = Path(params.root).expanduser()
        if not is_dir(root):
            raise DataError(f"{root}: decathlon root folder does not exist (expected the official layout "
                            f"{root}/data/<domain>/{{train,val,test}}/*.jpg with {root}/annotations/"
                            f"<domain>_{{train,val}}.json and <domain>_test_stripped.json)")
        self.params = params
        self.split = split
        self.domain = params.domain
        index = _joined_index([read_official_index(root, params.domain, part, params.check_files)
                               if params.layout == "official" else read_imagefolder_index(root, params.domain, part)
                               for part in split.split("+")])
        self.paths: list[Path] = index["paths"]
        self.labels: list[int] = index["labels"]
        self.image_ids: list[int] = index["ids"]
        # only the official annotations carry the ids the test server scores submissions by
        self.server_image_ids: bool = params.layout == "official"
        self.category_offset: int = index["offset"]
        self.num_classes: int = index["num_classes"]
        self.class_names: list[str] = index["class_names"]
        self.source = index["source"]
        self.augment = (params.augment and split in ("train", "train+val")
                        and augments(params.augmentation, params.domain))
        self.flip = self.augment and flips(params.augmentation, params.domain)
        if params.normalize:
            stats_file = params.stats_file
            stats = load_stats(stats_file)
            if params.domain not in stats:
                raise DataError(f"{stats_file or 'decathlon_stats.json'}: no mean/std for domain '{params.domain}'")
            self.mean = torch.tensor(stats[params.domain]["mean"]).view(3, 1, 1)
            self.std = torch.tensor(stats[params.domain]["std"]).view(3, 1, 1)
        else:
            self.mean = self.std = None
        self._cache: dict[int, np.ndarray] | None = {} if params.cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def decoded(self, index: int) -> np.ndarray:
        """The decoded uint8 image, short side ``image_size`` (cached if asked)."""
        square = self.params.augmentation == "padded_square"
        if self._cache is not None:
            arr = self._cache.get(index)
            if arr is None:
                arr = self._cache[index] = decode_image(self.paths[index], self.params.image_size, square)
            return arr
        return decode_image(self.paths[index], self.params.image_size, square)

    def _geometry(self, image: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.augment:
            return random_crop(image, p.crop, p.pad if p.augmentation == "padded_square" else 0, self.flip)
        return centre_crop(image, p.crop, p.augmentation)

    def _network_input(self, arr: np.ndarray, geometry) -> torch.Tensor:
        image = geometry(torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0))
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image.contiguous()

    def prepare_input(self, image: torch.Tensor) -> torch.Tensor:
        """Any image (3 x H x W in [0, 1]) as an evaluation sample of this domain: 8-bit, short
        side resized to ``image_size``, the centre crop, the domain's normalisation."""
        p = self.params
        arr = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        arr = fit_image(Image.fromarray(np.ascontiguousarray(arr), "RGB"), p.image_size,
                        p.augmentation == "padded_square")
        return self._network_input(arr, lambda x: centre_crop(x, p.crop, p.augmentation))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.paths):
            raise IndexError(index)
        image = self._network_input(self.decoded(index), self._geometry)
        return {"image": image, "label": torch.tensor(self.labels[index], dtype=torch.long),
                "image_id": int(self.image_ids[index])}


def _joined_index(indexes: list[dict[str, Any]]) -> dict[str, Any]:
    """One index of several splits' (train+val): their images in turn, the first's classes."""
    if len(indexes) == 1:
        return indexes[0]
    out = dict(indexes[0])
    for key in ("paths", "labels", "ids"):
        out[key] = [v for index in indexes for v in index[key]]
    return out


def tiny_decathlon(root: Path) -> dict:
    """Write a small copy of the official layout (two domains) under ``root``; params for one."""
    from .synthetic import write_decathlon_layout

    write_decathlon_layout(root, n_train=2, n_val=1, n_test=1, image_size=72, domains=["cifar100", "svhn"])
    return {"root": str(root), "domain": "svhn"}


@hookimpl
def register_datasets(register):
    register("decathlon", DecathlonDataset, params=DecathlonParams, tiny=tiny_decathlon,
             description="Visual Decathlon domain (official release or ImageFolder layout)")


__all__ = ["DecathlonDataset", "DecathlonParams", "decode_image", "read_official_index",
           "read_imagefolder_index"]
