"""File-level checks shared by the .npy releases (NYUv2, CityScapes).

Each function turns a problem into one :class:`~mtlkit.errors.DataError` line naming the file
or folder: folders that cannot be listed, files that are not one .npy array, empty arrays,
images of different sizes in a split (read from the .npy headers only), values that
overflow float32, and surface normals that are not unit vectors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from mtlkit.errors import DataError, os_reason

INDEX_FILE = re.compile(r"^(\d+)\.npy$")
ZIP_MAGIC = b"PK\x03\x04"
# Normal vectors: the median of | |n| - 1 | over valid (non-zero) pixels must stay within
# UNIT_MEDIAN_TOL, and at most UNIT_OUTLIER_SHARE of them may be off by more than
# UNIT_OUTLIER_TOL (interpolated edges of a resized release are shorter than 1).
UNIT_MEDIAN_TOL = 1e-2
UNIT_OUTLIER_TOL = 0.1
UNIT_OUTLIER_SHARE = 0.05


def list_indices(folder: Path) -> set[int]:
    """The ``i`` of every ``{i}.npy`` file in ``folder``."""
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DataError(f"cannot list folder '{folder}' ({os_reason(exc)})") from None
    return {int(m.group(1)) for name in names if (m := INDEX_FILE.match(name))}


def load_npy(path: Path) -> np.ndarray:
    """One non-empty array from an .npy file (no pickles)."""
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None
    except Exception as exc:  # truncated file, pickled object, not an .npy at all
        raise DataError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
    if not isinstance(a, np.ndarray):  # an .npz archive saved under an .npy name
        names = ", ".join(getattr(a, "files", [])) or "none"
        if hasattr(a, "close"):
            a.close()
        raise DataError(f"{path}: is an .npz archive (arrays: {names}), not one .npy array")
    if a.size == 0:
        raise DataError(f"{path}: array is empty (shape {a.shape})")
    return a


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy file's header, without reading its data."""
    try:
        with open(path, "rb") as f:
            if f.read(4) == ZIP_MAGIC:
                raise DataError(f"{path}: is an .npz (zip) archive, not one .npy array")
            f.seek(0)
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:  # format 3.0 (utf-8 field names): let np.load read the header
                m = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = m.shape, m.dtype
                del m
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
    return tuple(shape), np.dtype(dtype)


def check_image_headers(paths: list[Path]) -> tuple[int, int]:
    """Every image is a non-empty H x W x 3 float array and all share one H x W (headers only)."""
    first: tuple[Path, tuple[int, int]] | None = None
    for path in paths:
        shape, dtype = npy_header(path)
        if len(shape) != 3 or shape[2] != 3:
            raise DataError(f"{path}: image must be H x W x 3, got shape {shape}")
        if not np.issubdtype(dtype, np.floating):
            raise DataError(f"{path}: image must be float in [0, 1], got dtype {dtype}")
        if 0 in shape:
            raise DataError(f"{path}: array is empty (shape {shape})")
        hw = (shape[0], shape[1])
        if first is None:
            first = (path, hw)
        elif hw != first[1]:
            raise DataError(f"{path}: image is {hw[0]} x {hw[1]} but {first[0].name} is {first[1][0]} x {first[1][1]}; "
                            "all images of a split must share one size")
    assert first is not None
    return first[1]


def to_float32(a: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``a`` as float32; NaN, Inf and values that overflow float32 are refused."""
    with np.errstate(over="ignore", invalid="ignore"):
        b = np.asarray(a, dtype=np.float32)
    if not np.isfinite(b).all():
        if np.isfinite(a).all():
            big = float(np.abs(a).max())
            raise DataError(f"{path}: {what} holds values beyond float32's range (max |x| = {big:.3g})")
        raise DataError(f"{path}: {what} holds NaN or Inf")
    return b


def check_unit_normals(a: np.ndarray, path: Path) -> None:
    """Valid (non-zero) H x W x 3 vectors must have unit length; the zero vector marks invalid."""
    valid = (a != 0).any(axis=2)
    v = a[valid].astype(np.float64)
    if not len(v):
        return
    norms = np.sqrt(np.einsum("nc,nc->n", v, v))
    dev = np.abs(norms - 1.0)
    if np.median(dev) <= UNIT_MEDIAN_TOL and (dev > UNIT_OUTLIER_TOL).mean() <= UNIT_OUTLIER_SHARE:
        return
    hint = "; stored as (n+1)/2? save 2*x - 1" if v.min() >= 0 else ""
    raise DataError(f"{path}: normal vectors must have unit length (zero vector = invalid), found lengths "
                    f"in [{norms.min():.3g}, {norms.max():.3g}] (median {np.median(norms):.3g}){hint}")
