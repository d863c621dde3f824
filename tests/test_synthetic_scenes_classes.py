"""synthetic_scenes at 2 classes: the 13-class scene of the same seed, labels coarsened."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlkit.plugins.datasets.synthetic_scenes as scenes
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.datasets.scenes_render import render

H, W = 24, 32


def dataset(split="train", **params):
    base = {"height": H, "width": W, "num_train": 6, "num_val": 3, "seed": 7}
    return get_registry().get("dataset", "synthetic_scenes").build({**base, **params}, split=split)


@pytest.mark.parametrize("split", ["train", "val"])
def test_two_classes_coarsen_the_13_class_scene(split):
    two, thirteen = dataset(split, num_classes=2), dataset(split, num_classes=13)
    seen = set()
    for i in range(len(two)):
        a, b = two[i], thirteen[i]
        # same room: image, depth and normals are identical
        for key in ("image", "depth", "normal"):
            assert torch.equal(a[key], b[key]), key
        # mapping written out here, independently of the renderer's table:
        # floor 0, wall 1, ceiling 2, picture 3 -> 0 (structure); objects 4..12 -> 1
        fine = b["segmentation"].numpy()
        expected = np.where(np.isin(fine, [0, 1, 2, 3]), 0, 1)
        assert np.array_equal(a["segmentation"].numpy(), expected)
        assert a["segmentation"].dtype == torch.int64
        seen |= set(np.unique(a["segmentation"].numpy()).tolist())
    assert seen == {0, 1}  # both classes occur in a few scenes


def test_two_class_render_matches_raw_13_class_render():
    a = render([3, 0, 1], H, W, 2, 0.02)
    b = render([3, 0, 1], H, W, 13, 0.02)
    assert np.array_equal(a["image"], b["image"])
    assert np.array_equal(a["label"], (b["label"] >= 4).astype(np.int64))


def test_class_counts_between_2_and_7_are_refused():
    for n in (1, 3, 6):
        with pytest.raises(ConfigError, match="num_classes"):
            dataset(num_classes=n)
    with pytest.raises(ValueError, match="num_classes"):
        render([0], H, W, 5, 0.0)


def test_seven_classes_unchanged():
    # >= 7 classes are not routed through the 2-class path: labels span room and objects
    labels = np.concatenate([dataset(num_classes=7)[i]["segmentation"].numpy().ravel() for i in range(6)])
    assert labels.min() >= 0 and labels.max() < 7 and labels.max() >= 4


def test_nyuv2_layout_at_two_classes(tmp_path):
    out = scenes.write_nyuv2_layout(tmp_path / "nyu", n_train=2, n_val=1, height=H, width=W, num_classes=2, seed=7)
    label = np.load(out / "train" / "label" / "0.npy")
    assert set(np.unique(label).tolist()) <= {0, 1}
    assert np.array_equal(label, dataset(num_classes=2)[0]["segmentation"].numpy())
