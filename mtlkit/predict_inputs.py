"""The inputs of ``mtlkit predict``: image files (through PIL) and ``.npy`` arrays, read
into a 3 x H x W float tensor in [0, 1], every refusal one line naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

NPY = ".npy"


# -- inputs ----------------------------------------------------------------------------------
def read_input(path: str | os.PathLike) -> torch.Tensor:
    """An image file (PNG, JPEG, ... through PIL) or a ``.npy`` array (H x W, H x W x 3 or
    3 x H x W; floats in [0, 1] or uint8) as a 3 x H x W float tensor in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: input {'is not a file' if p.exists() else 'file does not exist'}")
    if p.suffix.lower() == NPY:
        a = src = _load_npy(p)  # src: the file's own values, counted in messages
        if a.size == 0:
            raise DataError(f"{p}: the input array is empty (shape {a.shape})")
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        elif a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
            a = a.transpose(1, 2, 0)
        if a.ndim != 3 or a.shape[2] != 3:
            raise DataError(f"{p}: an input array must be H x W, H x W x 3 or 3 x H x W, got shape {a.shape}")
        if a.dtype == np.uint8:
            a = a / 255.0
        elif not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{p}: an input array must hold floats in [0, 1] or uint8, got {a.dtype}")
        elif not np.isfinite(src).all():
            bad = " and ".join(f"{n} {k}" for n, k in ((np.isnan(src).sum(), "NaN"), (np.isinf(src).sum(), "inf")) if n)
            raise DataError(f"{p}: the input array holds {bad} among its {src.size} {src.dtype} values; "
                            "floats must be finite, in [0, 1]")
        elif a.min() < 0 or a.max() > 1:
            raise DataError(f"{p}: an input array of floats must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"{p}: cannot read as an image ({type(exc).__name__}: {exc})") from None
    if a.size == 0:
        raise DataError(f"{p}: the image is empty ({a.shape[1]} x {a.shape[0]} pixels)")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _load_npy(p: Path) -> np.ndarray:
    """``p``'s array; no .npy magic, Python objects (loading them unpickles, which can run
    code) or a damaged file is one line."""
    from numpy.lib import format as npy

    try:
        with open(p, "rb") as fh:
            magic, dtype = fh.read(len(npy.MAGIC_PREFIX)), None
            if magic == npy.MAGIC_PREFIX:  # the header tells whether loading would unpickle
                fh.seek(0)
                read = npy.read_array_header_1_0 if npy.read_magic(fh) == (1, 0) else npy.read_array_header_2_0
                dtype = read(fh)[2]
                if not dtype.hasobject:
                    return np.load(p, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - unreadable, a damaged header, truncated data
        raise DataError(f"{p}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
    if dtype is not None:
        raise DataError(f"{p}: the array holds Python objects (dtype {dtype}), refused for safety (loading "
                        "them runs pickle); save numbers: uint8, or floats in [0, 1]")
    seen = f"it starts with {magic!r}, not {npy.MAGIC_PREFIX!r}" if magic else "an empty file"
    raise DataError(f"{p}: not a NumPy .npy file ({seen}{'; a zip, as .npz files are' if magic[:2] == b'PK' else ''})")
