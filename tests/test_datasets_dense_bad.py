"""NYUv2 / CityScapes .npy loaders: bad layouts give one DataError line naming the file or folder."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mtlkit.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_datasets_dense import H, W, cs, nyu, nyu_arrays, write_cs, write_nyu  # noqa: E402


def load_all(ds):
    return [ds[i] for i in range(len(ds))]


def refused(match, build, *args, **kwargs):
    """The DataError that building (and reading every sample of) the data set raises."""
    with pytest.raises(DataError, match=match) as info:
        load_all(build(*args, **kwargs))
    assert "\n" not in str(info.value)
    return str(info.value)


# -- 1. folders that cannot be read --------------------------------------------------------
def deny(monkeypatch, folder: Path) -> None:
    """chmod 0 ``folder``; where that does not stop this user (root), make listing it, or
    looking inside it, raise PermissionError as it would for anyone else."""
    folder.chmod(0)
    if not os.access(folder, os.R_OK):
        return
    real_listdir, real_is_dir = os.listdir, Path.is_dir

    def inside(p) -> bool:
        p = Path(p)
        return p == folder or folder in p.parents

    def listdir(p="."):
        if inside(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_listdir(p)

    def is_dir(self):
        if folder in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(Path, "is_dir", is_dir)


@pytest.mark.parametrize("sub", ["train/label", "train"])
def test_unreadable_folder_is_named(tmp_path, monkeypatch, sub):
    write_nyu(tmp_path)
    folder = tmp_path / sub
    try:
        deny(monkeypatch, folder)
        msg = refused("Permission denied", nyu, tmp_path)
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)
    assert str(folder) in msg
    nyu(tmp_path)  # readable again: builds


# -- 2. an .npz saved under an .npy name ---------------------------------------------------
@pytest.mark.parametrize("folder", ["image", "label", "normal"])
def test_npz_under_npy_name(tmp_path, folder):
    write_nyu(tmp_path)
    with open(tmp_path / "train" / folder / "1.npy", "wb") as f:
        np.savez(f, x=nyu_arrays(1)[folder])
    refused(rf"{folder}/1\.npy: is an \.npz", nyu, tmp_path)


# -- 3. empty arrays -------------------------------------------------------------------------
def test_empty_arrays(tmp_path):
    write_nyu(tmp_path)
    empty = {"image": (0, 0, 3), "label": (0, 0), "depth": (0, 0, 1), "normal": (0, 0, 3)}
    for folder, shape in empty.items():
        np.save(tmp_path / "train" / folder / "1.npy", np.zeros(shape, np.float32))
    refused(r"image/1\.npy: array is empty \(shape \(0, 0, 3\)\)", nyu, tmp_path)
    for folder, shape in empty.items():  # every sample 0 x 0: still refused
        for i in range(3):
            np.save(tmp_path / "train" / folder / f"{i}.npy", np.zeros(shape, np.float32))
    refused(r"image/0\.npy: array is empty", nyu, tmp_path)
    write_nyu(tmp_path)
    np.save(tmp_path / "train" / "label" / "2.npy", np.zeros((0, W), np.float32))
    refused(r"label/2\.npy: array is empty", nyu, tmp_path)


# -- 4. samples of different sizes in one split -------------------------------------------
def test_mixed_sizes_are_refused_when_built(tmp_path, monkeypatch):
    write_nyu(tmp_path)
    g = np.random.default_rng(1)
    big = {"image": g.uniform(0, 1, (2 * H, W, 3)), "label": np.zeros((2 * H, W)),
           "depth": np.ones((2 * H, W)), "normal": np.tile([0.0, 0.0, 1.0], (2 * H, W, 1))}
    for folder, a in big.items():
        np.save(tmp_path / "train" / folder / "1.npy", a.astype(np.float32))
    # sample 1 on its own is consistent: the per-sample checks alone would pass it
    reads = []
    monkeypatch.setattr(np, "load", lambda *a, **k: reads.append(a) or pytest.fail("read data"))
    with pytest.raises(DataError, match=rf"image/1\.npy: image is {2 * H} x {W} but 0\.npy is {H} x {W}"):
        nyu(tmp_path)
    assert not reads  # headers only


# -- 5. images outside [0, 1] -----------------------------------------------------------------
@pytest.mark.parametrize("scale, shift, hint", [(255.0, 0.0, "0..255"), (1.0, -0.5, r"\[-0\.49")])
def test_image_outside_unit_range(tmp_path, scale, shift, hint):
    write_nyu(tmp_path)
    np.save(tmp_path / "train" / "image" / "2.npy", nyu_arrays(2)["image"] * scale + shift)
    msg = refused(r"image/2\.npy: image must be float in \[0, 1\], found values in", nyu, tmp_path)
    assert re.search(hint, msg)
    # rounding just past the ends is accepted
    np.save(tmp_path / "train" / "image" / "2.npy", nyu_arrays(2)["image"] * 1.0005 - 2e-4)
    load_all(nyu(tmp_path))


# -- 6. finite float64 values that overflow float32 ------------------------------------------
@pytest.mark.parametrize("folder, shape", [("depth", (H, W)), ("image", (H, W, 3)), ("normal", (H, W, 3))])
def test_float64_overflowing_float32(tmp_path, folder, shape):
    write_nyu(tmp_path)
    np.save(tmp_path / "train" / folder / "2.npy", np.full(shape, 1e300))
    refused(rf"{folder}/2\.npy: {folder} holds values beyond float32's range \(max \|x\| = 1e\+300\)", nyu, tmp_path)
    with np.errstate(over="ignore"):
        np.save(tmp_path / "train" / folder / "2.npy", np.full(shape, np.inf))
    refused(rf"{folder}/2\.npy: {folder} holds NaN or Inf", nyu, tmp_path)


# -- 7. surface normals that are not unit vectors ---------------------------------------------
def test_normals_must_be_unit(tmp_path):
    write_nyu(tmp_path)
    path = tmp_path / "train" / "normal" / "2.npy"
    n = nyu_arrays(2)["normal"]
    np.save(path, np.full((H, W, 3), 0.01, np.float32))
    msg = refused(r"normal/2\.npy: normal vectors must have unit length .*found lengths in \[0\.0173", nyu, tmp_path)
    assert "(n+1)/2" in msg  # every component in [0, 1]
    valid = (n != 0).any(axis=2, keepdims=True)
    np.save(path, np.where(valid, (n + 1) / 2, 0))  # the [0, 1] image encoding
    refused(r"normal/2\.npy: .*unit length.*stored as \(n\+1\)/2\?", nyu, tmp_path)
    np.save(path, n * 0.95)  # every vector 5% short
    msg = refused(r"normal/2\.npy: .*unit length.*median 0\.95", nyu, tmp_path)
    assert "(n+1)/2" not in msg
    # zero vectors (invalid) and a few short vectors (interpolated edges) are accepted
    short = n.copy()
    short[0, :4] = short[0, :4] * 0.7
    short[1] = 0
    np.save(path, short)
    load_all(nyu(tmp_path))


# -- 8. folders with different index sets ------------------------------------------------------
@pytest.mark.parametrize("folder", ["label", "depth", "normal"])
def test_extra_index_files(tmp_path, folder):
    write_nyu(tmp_path, n_train=5)
    for i in range(2, 5):
        for f in ("image", "label", "depth", "normal"):
            if f != folder:
                (tmp_path / "train" / f / f"{i}.npy").unlink()
    msg = refused(rf"{folder}/2\.npy' has no image/2\.npy", nyu, tmp_path)
    assert f"folder '{tmp_path / 'train' / folder}' holds 3 extra" in msg
    nyu(tmp_path, targets=[t for t in ("segmentation", "depth", "normal") if nyu_folder(t) != folder])


def nyu_folder(target):
    return {"segmentation": "label", "depth": "depth", "normal": "normal"}[target]


def test_cityscapes_folders_match_when_built(tmp_path):
    write_cs(tmp_path, n=3)
    np.save(tmp_path / "train" / "label_7" / "3.npy", np.zeros((H, W), np.float32))
    refused(r"label_7/3\.npy' has no image/3\.npy", cs, tmp_path)
    (tmp_path / "train" / "label_7" / "3.npy").unlink()
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DataError, match=r"depth/1\.npy' is missing"):
        cs(tmp_path)  # reported when built, before any sample is read
    cs(tmp_path, targets=["segmentation"])
