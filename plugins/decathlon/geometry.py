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

import torch
import torch.nn.functional as F

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
