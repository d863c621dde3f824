"""NYUv2 / CityScapes .npy loaders: read-back, target selection, augmentation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlkit.errors import ConfigError, DataError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.datasets.nyuv2 import SCALES, augment

H, W = 12, 16


def nyu_arrays(i, c=13, seed=0):
    g = np.random.default_rng([seed, i])
    image = g.uniform(0, 1, (H, W, 3)).astype(np.float32)
    label = g.integers(-1, c, (H, W)).astype(np.float32)  # the release stores labels as floats
    depth = g.uniform(0.5, 8, (H, W, 1)).astype(np.float32)
    depth[g.uniform(size=depth.shape) < 0.2] = 0
    normal = g.normal(size=(H, W, 3))
    normal = (normal / np.linalg.norm(normal, axis=2, keepdims=True)).astype(np.float32)
    normal[g.uniform(size=(H, W)) < 0.1] = 0
    return {"image": image, "label": label, "depth": depth, "normal": normal}


def write_nyu(root, n_train=3, n_val=2):
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            for folder, a in nyu_arrays(i + 100 * (split == "val")).items():
                d = root / split / folder
                d.mkdir(parents=True, exist_ok=True)
                np.save(d / f"{i}.npy", a)
    return root


def nyu(root, split="train", **params):
    return get_registry().get("dataset", "nyuv2").build({"root": str(root), **params}, split=split)


def test_nyuv2_reads_back_the_arrays(tmp_path):
    write_nyu(tmp_path)
    ds = nyu(tmp_path)
    assert len(ds) == 3 and len(nyu(tmp_path, "val")) == 2
    for i in range(3):
        a = nyu_arrays(i)
        s = ds[i]
        assert s["image"].dtype == torch.float32 and s["segmentation"].dtype == torch.int64
        np.testing.assert_array_equal(s["image"].numpy(), a["image"].transpose(2, 0, 1))
        np.testing.assert_array_equal(s["segmentation"].numpy(), a["label"].astype(np.int64))
        np.testing.assert_array_equal(s["depth"].numpy(), a["depth"].transpose(2, 0, 1))
        np.testing.assert_array_equal(s["normal"].numpy(), a["normal"].transpose(2, 0, 1))
    # "test" falls back to val (the release has no test split)
    np.testing.assert_array_equal(nyu(tmp_path, "test")[1]["image"].numpy(), nyu_arrays(101)["image"].transpose(2, 0, 1))


def test_nyuv2_targets_and_limit(tmp_path):
    write_nyu(tmp_path)
    ds = nyu(tmp_path, targets=["depth"], limit=2)
    assert len(ds) == 2 and set(ds[0]) == {"image", "depth"}
    # depth stored as H x W (no channel) reads the same
    np.save(tmp_path / "train" / "depth" / "0.npy", nyu_arrays(0)["depth"][..., 0])
    np.testing.assert_array_equal(ds[0]["depth"].numpy()[0], nyu_arrays(0)["depth"][..., 0])
    with pytest.raises(ConfigError, match="targets"):
        nyu(tmp_path, targets=["semantic"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "train" / "label" / "1.npy").unlink(), "label/1.npy"),
        (lambda r: (r / "train" / "image" / "1.npy").unlink(), "image/1.npy"),
        (lambda r: np.save(r / "train" / "label" / "2.npy", np.full((H, W), 13.0)), "label/2.npy"),
        (lambda r: np.save(r / "train" / "label" / "2.npy", np.full((H, W), 0.5)), "label/2.npy"),
        (lambda r: np.save(r / "train" / "image" / "2.npy", np.full((H, W, 3), np.nan, np.float32)), "image/2.npy"),
        (lambda r: np.save(r / "train" / "image" / "2.npy", np.zeros((H, W, 3), np.uint8)), "image/2.npy"),
        (lambda r: np.save(r / "train" / "image" / "2.npy", np.zeros((3, H, W), np.float32)), "image/2.npy"),
        (lambda r: np.save(r / "train" / "depth" / "2.npy", np.zeros((H + 1, W), np.float32)), "depth/2.npy"),
        (lambda r: np.save(r / "train" / "normal" / "2.npy", np.full((H, W, 3), 2.0, np.float32)), "normal/2.npy"),
        (lambda r: (r / "train" / "normal" / "2.npy").write_bytes(b"not an npy"), "normal/2.npy"),
    ],
)
def test_nyuv2_bad_files_name_the_file(tmp_path, damage, message):
    write_nyu(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        ds = nyu(tmp_path)
        for i in range(len(ds)):
            ds[i]


def test_nyuv2_bad_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        nyu(tmp_path / "nowhere")
    write_nyu(tmp_path)
    with pytest.raises(DataError, match="split folder"):
        nyu(tmp_path, "test_missing")
    for f in (tmp_path / "val" / "image").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="empty split"):
        nyu(tmp_path, "val")
    with pytest.raises(ConfigError, match="num_classes"):
        nyu(tmp_path, num_classes=1)
    # labels above num_classes-1 are caught when a sample loads
    with pytest.raises(DataError, match="label/0.npy"):
        nyu(tmp_path, num_classes=5)[0]


# -- augmentation vs an independent numpy resize ----------------------------------------------
def np_nearest(a, out_h, out_w):
    """torch 'nearest': source index floor(dst * in / out)."""
    h, w = a.shape[-2:]
    ys = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(int), h - 1)
    xs = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(int), w - 1)
    return a[..., ys[:, None], xs[None, :]]


def np_bilinear_ac(a, out_h, out_w):
    """Bilinear with align_corners=True."""
    h, w = a.shape[-2:]
    y = np.arange(out_h) * ((h - 1) / (out_h - 1))
    x = np.arange(out_w) * ((w - 1) / (out_w - 1))
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    a00, a01 = a[..., y0[:, None], x0[None, :]], a[..., y0[:, None], x1[None, :]]
    a10, a11 = a[..., y1[:, None], x0[None, :]], a[..., y1[:, None], x1[None, :]]
    return (1 - wy) * ((1 - wx) * a00 + wx * a01) + wy * ((1 - wx) * a10 + wx * a11)


def test_augmentation_matches_the_facts(tmp_path):
    write_nyu(tmp_path, n_train=1, n_val=1)
    plain = nyu(tmp_path)[0]
    seen = set()
    for seed in range(12):
        # replay the augmentation's draws (scale, top, left, flip) with the same generator
        g = torch.Generator().manual_seed(seed)
        s = SCALES[int(torch.randint(len(SCALES), (), generator=g))]
        ch, cw = int(H / s), int(W / s)
        top = int(torch.randint(H - ch + 1, (), generator=g))
        left = int(torch.randint(W - cw + 1, (), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        seen.add((s, flip))
        out = augment(plain, torch.Generator().manual_seed(seed))
        crop = {k: v.numpy()[..., top:top + ch, left:left + cw].astype(np.float64) for k, v in plain.items()}
        exp = {
            "image": np_bilinear_ac(crop["image"], H, W),
            "normal": np_bilinear_ac(crop["normal"], H, W),
            "segmentation": np_nearest(crop["segmentation"], H, W),
            "depth": np_nearest(crop["depth"], H, W) / s,
        }
        if flip:
            exp = {k: v[..., ::-1] for k, v in exp.items()}
            exp["normal"][0] *= -1
        for k in exp:
            np.testing.assert_allclose(out[k].numpy(), exp[k], rtol=1e-5, atol=1e-5, err_msg=f"{k} seed {seed}")
        assert out["segmentation"].dtype == torch.int64
    assert len({s for s, _ in seen}) >= 2 and {f for _, f in seen} == {True, False}


def test_seeded_augmentation_is_repeatable_per_epoch(tmp_path):
    write_nyu(tmp_path, n_train=2, n_val=1)
    a, b = nyu(tmp_path, augment=True, seed=3), nyu(tmp_path, augment=True, seed=3)
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    outs = []
    for epoch in range(6):
        a.set_epoch(epoch)
        outs.append(a[1]["image"])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# -- cityscapes ---------------------------------------------------------------------------------
def write_cs(root, n=3):
    for i in range(n):
        g = np.random.default_rng(i)
        arrays = {
            "image": g.uniform(0, 1, (H, W, 3)).astype(np.float32),
            "label_7": g.integers(-1, 7, (H, W)).astype(np.float32),
            "label_19": g.integers(-1, 19, (H, W)).astype(np.float32),
            "depth": np.where(g.uniform(size=(H, W)) < 0.2, 0, g.uniform(0.01, 0.5, (H, W))).astype(np.float32),
        }
        for folder, a in arrays.items():
            (root / "train" / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / "train" / folder / f"{i}.npy", a)


def cs(root, **params):
    return get_registry().get("dataset", "cityscapes").build({"root": str(root), **params}, split="train")


def test_cityscapes_label_sets(tmp_path):
    write_cs(tmp_path)
    stuff_or_things = {-1: -1, 0: 0, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 1}  # flat, constr., object, ...
    for i in range(3):
        l7 = np.load(tmp_path / "train" / "label_7" / f"{i}.npy").astype(int)
        l19 = np.load(tmp_path / "train" / "label_19" / f"{i}.npy").astype(int)
        np.testing.assert_array_equal(cs(tmp_path)[i]["segmentation"].numpy(), l7)
        np.testing.assert_array_equal(cs(tmp_path, num_classes=19)[i]["segmentation"].numpy(), l19)
        np.testing.assert_array_equal(cs(tmp_path, num_classes=2)[i]["segmentation"].numpy(),
                                      np.vectorize(stuff_or_things.get)(l7))
        depth = np.load(tmp_path / "train" / "depth" / f"{i}.npy")
        np.testing.assert_array_equal(cs(tmp_path)[i]["depth"].numpy()[0], depth)
    with pytest.raises(ConfigError, match="num_classes"):
        cs(tmp_path, num_classes=5)
    (tmp_path / "train" / "label_19" / "2.npy").unlink()
    with pytest.raises(DataError, match="label_19/2.npy"):
        cs(tmp_path, num_classes=19)
    cs(tmp_path, num_classes=7)  # label_19 is not needed for 7 classes


def test_cityscapes_reads_the_releases_own_two_class_labels(tmp_path):
    write_cs(tmp_path)
    # labels the mapping could never give: a checkerboard of 0/1 with a void corner
    l2 = (np.indices((H, W)).sum(0) % 2).astype(np.float32)
    l2[0, 0] = -1
    (tmp_path / "train" / "label_2").mkdir()
    np.save(tmp_path / "train" / "label_2" / "0.npy", l2)
    with pytest.raises(DataError, match="label_2/1.npy' is missing"):  # checked when built
        cs(tmp_path, num_classes=2)
    for i in range(3):
        np.save(tmp_path / "train" / "label_2" / f"{i}.npy", l2)
    for i in range(3):
        np.testing.assert_array_equal(cs(tmp_path, num_classes=2)[i]["segmentation"].numpy(), l2.astype(int))
    np.testing.assert_array_equal(cs(tmp_path)[0]["segmentation"].numpy(),  # 7 classes: label_7 as before
                                  np.load(tmp_path / "train" / "label_7" / "0.npy").astype(int))


def test_cityscapes_zoom_scales_disparity_up(tmp_path):
    write_cs(tmp_path, n=1)
    plain = np.unique(cs(tmp_path)[0]["depth"].numpy())
    for ref, power in ((False, 1), (True, -1)):
        ds = cs(tmp_path, augment=True, seed=0, reference_disparity_scaling=ref)
        scales = set()
        for epoch in range(8):
            ds.set_epoch(epoch)
            d = ds[0]["depth"].numpy().ravel()
            s = SCALES[int(torch.randint(len(SCALES), (), generator=ds._generator(0)))]  # the draw it made
            scales.add(s)
            # nearest resizing keeps input values, so every output / s**power is an input value
            back = d / s**power
            nearest = plain[np.clip(np.searchsorted(plain, back), 0, len(plain) - 1)]
            lower = plain[np.clip(np.searchsorted(plain, back) - 1, 0, len(plain) - 1)]
            gap = np.minimum(np.abs(nearest - back), np.abs(lower - back))
            assert gap.max() < 1e-6, (ref, s)
        assert len(scales) >= 2
