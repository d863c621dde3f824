"""Synthetic scenes: determinism, geometric consistency, and the real loaders reading its layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlkit.plugins.datasets.synthetic_scenes as scenes
from mtlkit.errors import ConfigError, DataError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.datasets.scenes_render import render

H, W = 24, 32


def dataset(split="train", **params):
    base = {"height": H, "width": W, "num_train": 4, "num_val": 2, "seed": 5}
    return get_registry().get("dataset", "synthetic_scenes").build({**base, **params}, split=split)


def test_samples_are_deterministic_and_well_formed():
    ds = dataset(num_classes=9)
    a, b = ds[2], dataset(num_classes=9)[2]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ds[1]["image"], a["image"])
    assert not torch.equal(dataset("val", num_classes=9)[1]["image"], ds[1]["image"])
    assert a["image"].shape == (3, H, W) and a["image"].dtype == torch.float32
    assert 0 <= float(a["image"].min()) and float(a["image"].max()) <= 1
    assert a["segmentation"].shape == (H, W) and a["segmentation"].dtype == torch.int64
    assert a["depth"].shape == (1, H, W) and float(a["depth"].min()) > 0
    n = a["normal"]
    assert n.shape == (3, H, W)
    np.testing.assert_allclose(n.norm(dim=0).numpy(), 1.0, atol=1e-5)
    labels = torch.cat([ds[i]["segmentation"].flatten() for i in range(4)])
    assert int(labels.min()) >= 0 and int(labels.max()) < 9
    assert set(dataset(targets=["depth"])[0]) == {"image", "depth"}
    with pytest.raises(ConfigError, match="num_classes"):
        dataset(num_classes=6)


def normals_from_depth(depth, K):
    """Back-project the depth map and take the cross product of central differences."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = depth.astype(np.float64)
    P = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
    du = P[1:-1, 2:] - P[1:-1, :-2]
    dv = P[2:, 1:-1] - P[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    facing = np.sign(-(n * P[1:-1, 1:-1]).sum(-1, keepdims=True))  # towards the camera
    return n * facing, P


@pytest.mark.parametrize("index", range(4))
def test_normals_agree_with_depth_gradients_on_planes(index):
    r = render([11, 0, index], 48, 64, 13, 0.0)
    est, P = normals_from_depth(r["depth"], r["K"])
    label = r["label"]
    # planar classes: floor, wall, ceiling, picture and boxes (object class 4 + j, j % 3 == 0)
    planar = (label < 4) | ((label >= 4) & ((label - 4) % 3 == 0))
    same = np.ones((46, 62), dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= label[1 + dy:47 + dy, 1 + dx:63 + dx] == label[1:-1, 1:-1]
    mask = same & planar[1:-1, 1:-1]
    assert mask.sum() > 500
    rendered = r["normal"][1:-1, 1:-1].astype(np.float64)
    ang = np.degrees(np.arccos(np.clip((est * rendered).sum(-1)[mask], -1, 1)))
    assert np.median(ang) < 0.1, np.median(ang)
    assert np.mean(ang < 5) > 0.9
    # every rendered normal faces the camera
    assert ((r["normal"].astype(np.float64) * P).sum(-1) < 0).all()


def test_nyuv2_loader_reads_the_written_layout(tmp_path):
    out = scenes.write_nyuv2_layout(tmp_path / "nyu", n_train=4, n_val=2, height=H, width=W, num_classes=13, seed=5)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert [p.name for p in tmp_path.iterdir()] == ["nyu"]  # no temp folder left behind
    for split, n in (("train", 4), ("val", 2)):
        loaded = get_registry().get("dataset", "nyuv2").build({"root": str(out)}, split=split)
        rendered = dataset(split, num_classes=13)
        assert len(loaded) == n
        for i in range(n):
            a, b = loaded[i], rendered[i]
            assert set(a) == set(b)
            for k in a:
                assert torch.equal(a[k], b[k]), (split, i, k)


def test_cityscapes_loader_reads_the_written_layout(tmp_path):
    out = scenes.write_cityscapes_layout(tmp_path / "cs", n_train=3, n_val=2, height=H, width=W, seed=2)
    # scene class -> CityScapes 7: floor flat, wall construction, ceiling sky, picture object;
    # box vehicle, sphere nature, cylinder human
    to7 = np.array([0, 1, 4, 2] + [[6, 3, 5][j % 3] for j in range(15)])
    build = get_registry().get("dataset", "cityscapes").build
    for split, n in (("train", 3), ("val", 2)):
        l19 = build({"root": str(out), "num_classes": 19}, split=split)
        l7 = build({"root": str(out), "num_classes": 7}, split=split)
        for i in range(n):
            r = scenes.render_sample(2, split, i, H, W, 19, 0.02)
            np.testing.assert_array_equal(l19[i]["segmentation"].numpy(), r["label"])
            np.testing.assert_array_equal(l7[i]["segmentation"].numpy(), to7[r["label"]])
            np.testing.assert_array_equal(l7[i]["image"].numpy(), r["image"].transpose(2, 0, 1))
            disparity = l7[i]["depth"].numpy()[0]
            np.testing.assert_allclose(disparity, 0.25 / r["depth"].astype(np.float64), rtol=1e-6)
            assert 0 < disparity.min() and disparity.max() < 0.6


def test_writers_refuse_non_empty_folders_and_clean_up(tmp_path, monkeypatch):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="busy"):
        scenes.write_nyuv2_layout(target, 1, 1, H, W)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    scenes.write_nyuv2_layout(empty, 1, 1, H, W)  # an existing empty folder is fine
    assert (empty / "val" / "normal" / "0.npy").is_file()

    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return render([0, 0, 0], H, W, 13, 0.0)

    monkeypatch.setattr(scenes, "render_sample", failing)
    with pytest.raises(RuntimeError):
        scenes.write_nyuv2_layout(tmp_path / "half", 3, 1, H, W)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # nothing half-written
