"""The decathlon loader (official and ImageFolder layouts), the synthetic writer read back
end to end, bad inputs, normalisation statistics and the in-memory synthetic domains."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtlkit.errors import ConfigError, DataError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.decathlon import domains as dec
from mtlkit.plugins.decathlon import stats as decathlon_stats
from mtlkit.plugins.decathlon.mean_std import compute_mean_std
from mtlkit.plugins.decathlon.synthetic import SYNTHETIC_CLASSES, generate, write_decathlon_layout

N_TRAIN, N_VAL, N_TEST = 6, 3, 2


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec") / "decathlon-1.0"
    summary = write_decathlon_layout(root, N_TRAIN, N_VAL, N_TEST, image_size=72, seed=3)
    return root, summary


def load(root, domain, split="train", **params):
    return get_registry().get("dataset", "decathlon").build({"root": str(root), "domain": domain, **params}, split=split)


def copy_of(layout, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(layout[0], dst)
    return dst


def test_writer_produces_the_official_layout(layout):
    root, summary = layout
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "data"]
    assert len(list((root / "annotations").iterdir())) == 30
    for d in dec.DOMAINS:
        for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
            assert len(list((root / "data" / d / split).glob("*.jpg"))) == n
        assert summary[d]["category_offset"] == dec.category_offset(d)
    ann = json.loads((root / "annotations" / "gtsrb_train.json").read_text())
    assert ann["images"][0]["file_name"] == "data/gtsrb/train/0000001.jpg"
    assert min(c["id"] for c in ann["categories"]) == 50000001
    stripped = json.loads((root / "annotations" / "gtsrb_test_stripped.json").read_text())
    assert "annotations" not in stripped and len(stripped["images"]) == N_TEST
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_read_back_every_domain_end_to_end(layout):
    root, _ = layout
    for d in dec.DOMAINS:
        ds = load(root, d, "val", normalize=False)
        assert len(ds) == N_VAL and ds.num_classes == SYNTHETIC_CLASSES[d]
        for i in range(N_VAL):
            sample = ds[i]
            expected, cls = generate(d, "val", i, 72, seed=3)
            assert sample["label"].item() == cls and sample["label"].dtype == torch.long
            assert sample["image"].shape == (3, 72, 72)
            # JPEG is lossy: close to the generated pixels, not equal
            diff = (sample["image"] - torch.from_numpy(expected).permute(2, 0, 1) / 255.0).abs().mean()
            assert diff < 0.05
        assert ds[0]["image_id"] == (list(dec.DOMAINS).index(d) + 1) * 10**7 + N_TRAIN + 1
    test = load(root, "svhn", "test")
    assert len(test) == N_TEST and test[0]["label"].item() == -1


def test_train_augmentation_crop_flip_and_normalisation(layout):
    root, _ = layout
    assert load(root, "svhn").flip is False and load(root, "dtd").flip is True
    assert load(root, "dtd", "val").augment is False
    torch.manual_seed(0)
    assert load(root, "dtd")[0]["image"].shape == (3, 72, 72)
    ds64 = load(root, "dtd", "val", crop=64, normalize=False)
    raw = load(root, "dtd", "val", normalize=False)[1]["image"]
    assert torch.equal(ds64[1]["image"], raw[:, 4:68, 4:68])  # centre crop for evaluation
    normed = load(root, "dtd", "val")[1]["image"]
    stats = decathlon_stats.load_stats()["dtd"]
    mean = torch.tensor(stats["mean"]).view(3, 1, 1)
    std = torch.tensor(stats["std"]).view(3, 1, 1)
    assert torch.allclose(normed, (raw - mean) / std, atol=1e-6)
    batch = next(iter(DataLoader(load(root, "cifar100", crop=64, pad=0), batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4,)
    assert batch["image_id"].dtype == torch.long


def test_cache_returns_the_same_decoded_arrays(layout):
    root, _ = layout
    ds = load(root, "ucf101", "val", cache=True, normalize=False)
    first = ds.decoded(0)
    assert ds.decoded(0) is first and len(ds._cache) == 1
    assert torch.equal(ds[0]["image"], load(root, "ucf101", "val", normalize=False)[0]["image"])


def test_imagefolder_layout(layout, tmp_path):
    root, _ = layout
    folder = tmp_path / "imagefolder"
    for split in ("train", "val"):
        ds = load(root, "daimlerpedcls", split, normalize=False)
        for path, label in zip(ds.paths, ds.labels):
            dst = folder / "daimlerpedcls" / split / str(label) / path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dst)
    (folder / "daimlerpedcls" / "test").mkdir()
    for path in load(root, "daimlerpedcls", "test").paths:
        shutil.copy(path, folder / "daimlerpedcls" / "test" / path.name)
    official = load(root, "daimlerpedcls", "val", normalize=False)
    ds = load(folder, "daimlerpedcls", "val", layout="imagefolder", normalize=False)
    assert len(ds) == N_VAL and ds.num_classes == 2
    assert sorted(ds.labels) == sorted(official.labels)
    test = load(folder, "daimlerpedcls", "test", layout="imagefolder")
    assert len(test) == N_TEST and set(test.labels) == {-1}
    with pytest.raises(DataError, match="split folder does not exist"):
        load(folder, "svhn", "train", layout="imagefolder")


# ------------------------------------------------------------------------------ bad input
def test_unknown_domain_suggests_the_closest(layout):  # a params error: `mtlkit validate` sees it
    with pytest.raises(ConfigError, match="domain: .*unknown domain 'cifar10', did you mean 'cifar100'"):
        load(layout[0], "cifar10")


def test_listed_image_missing(layout, tmp_path):
    root = copy_of(layout, tmp_path)
    (root / "data" / "dtd" / "train" / "0000002.jpg").unlink()
    with pytest.raises(DataError) as info:
        load(root, "dtd")
    assert "dtd_train.json" in str(info.value) and "0000002.jpg" in str(info.value)


def test_category_id_outside_the_domain(layout, tmp_path):
    root = copy_of(layout, tmp_path)
    path = root / "annotations" / "svhn_val.json"
    ann = json.loads(path.read_text())
    ann["annotations"][1]["category_id"] = dec.category_offset("svhn") + 10
    path.write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"svhn_val\.json: category id 80000011 .* outside domain 'svhn'"):
        load(root, "svhn", "val")


def test_image_that_does_not_decode(layout, tmp_path):
    root = copy_of(layout, tmp_path)
    bad = root / "data" / "omniglot" / "val" / f"{N_TRAIN + 1:07d}.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = load(root, "omniglot", "val")
    with pytest.raises(DataError, match=r"0000007\.jpg: image does not decode"):
        ds[0]


def test_test_split_without_images(layout, tmp_path):
    root = copy_of(layout, tmp_path)
    path = root / "annotations" / "aircraft_test_stripped.json"
    ann = json.loads(path.read_text())
    ann["images"] = []
    path.write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"aircraft_test_stripped\.json: the test split lists no images"):
        load(root, "aircraft", "test")


def test_missing_or_broken_annotation_files(layout, tmp_path):
    root = copy_of(layout, tmp_path)
    (root / "annotations" / "dtd_val.json").unlink()
    with pytest.raises(DataError, match=r"dtd_val\.json: annotation file does not exist"):
        load(root, "dtd", "val")
    (root / "annotations" / "dtd_train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dtd_train\.json: not readable JSON"):
        load(root, "dtd")
    with pytest.raises(DataError, match="root folder does not exist"):
        load(tmp_path / "nowhere", "dtd")
    with pytest.raises(ConfigError):  # params are checked by the registry
        load(root, "dtd", crop=200)


def test_writer_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_decathlon_layout(tmp_path / "full", 1, 1, 1)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write_decathlon_layout(tmp_path / "empty", 1, 0, 1, image_size=32, domains=["svhn"])
    assert (tmp_path / "empty" / "annotations" / "svhn_train.json").is_file()


# ------------------------------------------------------------------------------ statistics
# The reference implementation's per-domain statistics (shared/reference/decathlon.md), typed
# in from that table, not read from the shipped file.
REFERENCE_STATS = {
    "imagenet12": ([0.485000, 0.456000, 0.406000], [0.229000, 0.224000, 0.225000]),
    "aircraft": ([0.479830, 0.510741, 0.534380], [0.210702, 0.205089, 0.237297]),
    "cifar100": ([0.507059, 0.486667, 0.440784], [0.267451, 0.256471, 0.276078]),
    "daimlerpedcls": ([0.482035] * 3, [0.236126] * 3),
    "dtd": ([0.526965, 0.470252, 0.423967], [0.252269, 0.240918, 0.249941]),
    "gtsrb": ([0.339213, 0.311784, 0.320470], [0.275603, 0.265761, 0.270899]),
    "omniglot": ([0.080998] * 3, [0.270469] * 3),
    "svhn": ([0.437682, 0.443770, 0.472804], [0.198030, 0.201016, 0.197036]),
    "ucf101": ([0.499531, 0.498804, 0.499820], [0.108987, 0.108102, 0.106799]),
    "vgg-flowers": ([0.434147, 0.383099, 0.297148], [0.285098, 0.238423, 0.263963]),
}


def test_shipped_stats_are_the_reference_per_domain_values(recwarn):
    stats = decathlon_stats.load_stats()
    assert set(stats) == set(dec.DOMAINS)
    for d, (mean, std) in REFERENCE_STATS.items():
        assert stats[d]["mean"] == pytest.approx(mean, abs=5e-7), d
        assert stats[d]["std"] == pytest.approx(std, abs=5e-7), d
    assert json.loads(decathlon_stats.stats_path().read_text())["placeholder"] is False
    assert not [w for w in recwarn if "placeholder" in str(w.message)]


def test_loader_normalises_omniglot_with_its_own_mean(layout):
    ds = load(layout[0], "omniglot", "val")
    assert ds.mean.flatten().tolist() == pytest.approx([0.080998] * 3)
    assert ds.std.flatten().tolist() == pytest.approx([0.270469] * 3)


def test_a_placeholder_stats_file_warns(layout, tmp_path):
    path = tmp_path / "ph.json"
    path.write_text(json.dumps({"placeholder": True, "domains": {"svhn": {"mean": [0.5] * 3, "std": [0.25] * 3}}}))
    with pytest.warns(UserWarning, match=r"ph\.json: marked 'placeholder'"):
        load(layout[0], "svhn", "val", stats_file=str(path))
    path.write_text(json.dumps({"placeholder": "yes", "domains": {}}))
    with pytest.raises(DataError, match=r"ph\.json: 'placeholder' must be true or false"):
        decathlon_stats.load_stats(path)


def test_compute_and_use_mean_std(layout, tmp_path):
    root, _ = layout
    stats = compute_mean_std(root, domains=["gtsrb"], split="val")
    imgs = torch.stack([load(root, "gtsrb", "val", normalize=False)[i]["image"] for i in range(N_VAL)]).double()
    assert stats["gtsrb"]["mean"] == pytest.approx(imgs.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert stats["gtsrb"]["std"] == pytest.approx(imgs.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-5)
    path = decathlon_stats.write_stats(stats, tmp_path / "stats.json")
    assert decathlon_stats.load_stats(path) == stats
    ds = load(root, "gtsrb", "val", stats_file=str(path))
    assert torch.allclose(ds.mean.flatten(), torch.tensor(stats["gtsrb"]["mean"]))
    with pytest.raises(DataError, match="no mean/std for domain 'svhn'"):
        load(root, "svhn", "val", stats_file=str(path))
    (tmp_path / "bad.json").write_text(json.dumps({"domains": {"svhn": {"mean": [0, 0], "std": [1, 1, 1]}}}))
    with pytest.raises(DataError, match=r"bad\.json: domain 'svhn' needs 3 means"):
        decathlon_stats.load_stats(tmp_path / "bad.json")


# ------------------------------------------------------------------------------ synthetic, in memory
def test_synthetic_decathlon_in_memory():
    counts = SYNTHETIC_CLASSES
    assert list(counts) == list(dec.DOMAINS)
    assert all(2 <= n <= 20 for n in counts.values()) and len(set(counts.values())) >= 8
    build = get_registry().get("dataset", "synthetic_decathlon").build
    ds = build({"domain": "vgg-flowers", "size": 32, "n": 30}, split="train")
    assert len(ds) == 30 and ds.num_classes == 12
    s = ds[13]
    assert s["image"].shape == (3, 32, 32) and s["label"].item() == 13 % 12
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert torch.equal(ds[13]["image"], build({"domain": "vgg-flowers", "size": 32, "n": 30}, split="train")[13]["image"])
    assert not torch.equal(ds[13]["image"], build({"domain": "vgg-flowers", "size": 32, "n": 30}, split="val")[13]["image"])
    with pytest.raises(ConfigError, match="domain: .*did you mean 'vgg-flowers'"):  # a params error
        build({"domain": "vgg_flowers"}, split="train")


def test_synthetic_domains_differ_in_image_statistics():
    means = {d: np.stack([generate(d, "train", i, 32)[0] for i in range(20)]).reshape(-1, 3).mean(0) for d in dec.DOMAINS}
    assert means["omniglot"].min() > 200  # glyphs on white
    assert abs(means["daimlerpedcls"][0] - means["daimlerpedcls"][2]) < 1  # grey
    assert means["vgg-flowers"][1] > means["vgg-flowers"][2]  # green backdrop


@pytest.mark.slow
def test_every_synthetic_domain_is_learnable():
    # A small CNN at 32 px reaches well above chance on held-out images of every domain
    # (measured 0.41 .. 1.00; chance is 1 / classes): at least twice chance, or 0.7.
    from torch import nn

    for d, n_cls in SYNTHETIC_CLASSES.items():
        torch.manual_seed(0)

        def data(split, n):
            xs, ys = zip(*(generate(d, split, i, 32) for i in range(n)))
            return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255, torch.tensor(ys)

        x, y = data("train", max(400, 40 * n_cls))
        xv, yv = data("val", max(100, 10 * n_cls))
        net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_cls))
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(15):
            for idx in torch.randperm(len(x)).split(32):
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(xv).argmax(1) == yv).float().mean().item()
        assert acc > min(0.7, 2.0 / n_cls), f"{d}: accuracy {acc:.2f} with {n_cls} classes"


# ------------------------------------------------------------------------------ reference augmentation
@pytest.fixture(scope="module")
def wide_images(tmp_path_factory):
    """An ImageFolder copy with one 72 x 100 (H x W) PNG per domain: lossless, already at the
    release's short side, so decoded pixels equal the array written."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wide")
    arr = np.random.default_rng(0).integers(0, 256, size=(72, 100, 3), dtype=np.uint8)
    for d in ("dtd", "svhn", "gtsrb", "omniglot"):
        for split in ("train", "val"):
            (root / d / split / "0").mkdir(parents=True)
            Image.fromarray(arr).save(root / d / split / "0" / "a.png")
    return root, torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def windows_seen(ds, full, crop, n=60):
    """(top, left, flipped) of every sample: each must be an exact crop x crop window of the
    unpadded image (zero padding would match no window)."""
    seen = set()
    for _ in range(n):
        out = ds[0]["image"]
        assert out.shape == (3, crop, crop)
        hits = [(t, l, f) for t in range(full.shape[1] - crop + 1) for l in range(full.shape[2] - crop + 1)
                for f in (False, True)
                if torch.equal(out, full[:, t:t + crop, l:l + crop].flip(-1) if f else full[:, t:t + crop, l:l + crop])]
        assert hits, "output is no window of the image: padded or resized"
        seen.add(hits[0])
    return seen


def test_reference_augmentation_jitters_along_the_long_side_without_padding(wide_images):
    root, full = wide_images
    torch.manual_seed(0)
    ds = load(root, "dtd", layout="imagefolder", augmentation="reference", normalize=False)
    seen = windows_seen(ds, full, 72)
    assert {t for t, _, _ in seen} == {0}  # the short side is the crop: no vertical jitter
    assert len({l for _, l, _ in seen}) > 10 and all(0 <= l <= 28 for _, l, _ in seen)
    assert {f for _, _, f in seen} == {False, True}
    seen64 = windows_seen(load(root, "dtd", layout="imagefolder", augmentation="reference", crop=64,
                               normalize=False), full, 64)
    assert len({t for t, _, _ in seen64}) > 1 and max(l for _, l, _ in seen64) > 8  # 72 x 100 -> 64 x 64 windows
    val = load(root, "dtd", "val", layout="imagefolder", augmentation="reference", normalize=False)[0]["image"]
    assert torch.equal(val, full[:, :, 14:86])  # CenterCrop(72): round((100 - 72) / 2) = 14


@pytest.mark.parametrize("domain", ["gtsrb", "omniglot", "svhn"])
def test_reference_augmentation_leaves_signs_glyphs_and_digits_alone(wide_images, domain):
    root, full = wide_images
    torch.manual_seed(0)
    ds = load(root, domain, layout="imagefolder", augmentation="reference", normalize=False)
    assert ds.augment is False and ds.flip is False
    assert windows_seen(ds, full, 72, n=20) == {(0, 14, False)}  # the centre crop, every time


def test_reference_augmentation_refuses_a_pad(wide_images):
    with pytest.raises(ConfigError, match="pad: the reference augmentation crops without padding"):
        load(wide_images[0], "dtd", layout="imagefolder", augmentation="reference", pad=4)
    with pytest.raises(ConfigError, match=r"crop \(80\) must be at most image_size \(72\)"):
        load(wide_images[0], "dtd", layout="imagefolder", augmentation="reference", crop=80)
