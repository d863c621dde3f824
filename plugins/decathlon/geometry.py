"""What the network sees of a decoded Decathlon image: the two augmentation styles.

- ``"padded_square"`` (mtlkit's original behaviour, kept as the data set's default so that
  earlier runs stay reproducible): images are centre-cropped to an ``image_size`` square
  when decoded; training pads ``pad`` zero pixels on each side, takes a random ``crop``
  window and flips (except in :data:`NO_FLIP_DOMAINS`).
- ``"reference"`` (the reference implementation's protocol, used by the shipped Decathlon
  recipes): the decoded image keeps its aspect ratio (short side ``image_size``, like
  torchvision's ``Resize(72)``); training takes a random ``crop`` window with no padding,
  so with ``crop == image_size`` the jitter is along the longer side only, and flips;
  gtsrb, omniglot and svhn get no augmentation at all (the centre crop of evaluation).

Evaluation always takes the centre ``crop`` window; the reference style places it as
torchvision's ``CenterCrop`` does (``round((h - crop) / 2)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtlkit.errors import DataError

from .domains import NO_AUGMENT_DOMAINS, NO_FLIP_DOMAINS

AUGMENTATIONS = ("padded_square", "reference")


def augments(style: str, domain: str) -> bool:
    """Whether training images of ``domain`` are randomly cropped/flipped under ``style``."""
    return not (style == "reference" and domain in NO_AUGMENT_DOMAINS)


def flips(style: str, domain: str) -> bool:
    """Whether training images of ``domain`` are flipped (a flip changes a sign's or digit's class)."""
    return augments(style, domain) and domain not in NO_FLIP_DOMAINS


def centre_crop(image: torch.Tensor, crop: int, style: str) -> torch.Tensor:
    """The centre ``crop`` x ``crop`` window of a C x H x W image (zero-padded if smaller)."""
    h, w = image.shape[1:]
    if crop > h or crop > w:  # crop larger than the image: centred zero padding
        dh, dw = max(0, crop - h), max(0, crop - w)
        image = F.pad(image, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        h, w = image.shape[1:]
    if style == "reference":
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    else:
        top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top:top + crop, left:left + crop]


def random_crop(image: torch.Tensor, crop: int, pad: int, flip: bool) -> torch.Tensor:
    """A random ``crop`` window after ``pad`` zero pixels on each side, flipped with p = 0.5."""
    if pad:
        image = F.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[1:]
    top = int(torch.randint(h - crop + 1, ()))
    left = int(torch.randint(w - crop + 1, ()))
    image = image[:, top:top + crop, left:left + crop]
    if flip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    return image


def decode_image(path: Path, image_size: int, square: bool = True) -> np.ndarray:
    """Decode to RGB and resize the short side to ``image_size``; ``square``: then centre
    crop a square (else keep the aspect ratio, the long side truncated as torchvision's
    ``Resize`` does). HWC uint8."""
    try:
        with Image.open(path) as im:
            return fit_image(im.convert("RGB"), image_size, square)
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: image does not decode ({type(exc).__name__}: {exc})") from None


def fit_image(im: Image.Image, image_size: int, square: bool = True) -> np.ndarray:
    """An RGB PIL image with its short side resized to ``image_size`` (``square``: then centre
    cropped to a square), as HWC uint8: what :func:`decode_image` does after decoding."""
    w, h = im.size
    if min(w, h) != image_size:
        scale = image_size / min(w, h)
        size = (round(w * scale), round(h * scale)) if square else (int(w * scale), int(h * scale))
        size = (image_size, size[1]) if w <= h else (size[0], image_size)  # short side exact
        im = im.resize((max(image_size, size[0]), max(image_size, size[1])), Image.Resampling.BILINEAR)
        w, h = im.size
    if square:
        left, top = (w - image_size) // 2, (h - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    return np.asarray(im, dtype=np.uint8).copy()
