"""Paper-era evaluation rules, checked on examples small enough to compute by hand: the 2019
code's per-image segmentation metrics, and the reference's normal-validity rule."""

from __future__ import annotations

import pytest
import torch

from mtlkit.plugin_manager import get_registry


def build(name, **params):
    return get_registry().get("task", name).build(params, name=name)


def one_hot_logp(pred: torch.Tensor, c: int) -> torch.Tensor:
    """Log-probabilities whose argmax is ``pred`` (B x H x W)."""
    return torch.log_softmax(torch.nn.functional.one_hot(pred, c).permute(0, 3, 1, 2).float() * 10, 1)


# Image 1: target [[0, -1], [1, 1]], prediction [[0, 0], [1, 0]]: the ignore pixel is predicted 0.
#   class 0: union {(0,0), (0,1) ignore, (1,1)} = 3, intersection 1 -> 1/3
#   class 1: union {(1,0), (1,1)} = 2, intersection 1 -> 1/2      mIoU = 5/12; accuracy 2/3
# Image 2: target all 0, prediction all 0: class 0 IoU 1, class 1 absent -> mIoU 1; accuracy 1
TARGET = torch.tensor([[[0, -1], [1, 1]], [[0, 0], [0, 0]]])
PRED = torch.tensor([[[0, 0], [1, 0]], [[0, 0], [0, 0]]])


def test_per_image_2019_protocol_by_hand():
    task = build("segmentation", num_classes=2, protocol="per_image_2019")
    state = task.metrics()
    state.update(one_hot_logp(PRED[:1], 2), TARGET[:1])
    got = state.compute()
    assert got["miou"] == pytest.approx(100 * 5 / 12)
    assert got["pixel_acc"] == pytest.approx(100 * 2 / 3)
    state.update(one_hot_logp(PRED[1:], 2), TARGET[1:])
    got = state.compute()
    assert got["miou"] == pytest.approx(100 * (5 / 12 + 1) / 2)  # the mean over images
    assert got["pixel_acc"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_whole_split_protocol_differs_on_the_same_example():
    # the confusion matrix leaves the ignore pixel out: rows t0 = [5, 0], t1 = [1, 1]
    # IoU_0 = 5 / (5 + 6 - 5) = 5/6, IoU_1 = 1 / 2; accuracy 6 / 7
    state = build("segmentation", num_classes=2).metrics()
    state.update(one_hot_logp(PRED, 2), TARGET)
    got = state.compute()
    assert got["miou"] == pytest.approx(100 * (5 / 6 + 1 / 2) / 2)
    assert got["pixel_acc"] == pytest.approx(100 * 6 / 7)


def test_per_image_2019_states_merge_like_an_all_reduce():
    task = build("segmentation", num_classes=2, protocol="per_image_2019")
    a, b, whole = task.metrics(), task.metrics(), task.metrics()
    a.update(one_hot_logp(PRED[:1], 2), TARGET[:1])
    b.update(one_hot_logp(PRED[1:], 2), TARGET[1:])
    whole.update(one_hot_logp(PRED, 2), TARGET)
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())


# A 1 x 3 image of normals: a genuine normal whose components sum to 0 (not the zero vector),
# the zero vector (missing), and (0, 0, 1).
NORMALS = torch.tensor([[0.6, -0.6, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 3)
PRED_N = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 3)


def test_reference_normal_rule_drops_a_pixel_whose_components_sum_to_zero():
    assert float(NORMALS[0, :, 0, 0].sum()) == 0.0 and bool((NORMALS[0, :, 0, 0] != 0).any())
    ref = build("normal", protocol="reference")
    # only pixel 3 counts: its dot product is 1, angle 0
    assert float(ref.loss(PRED_N, NORMALS)) == pytest.approx(0.0, abs=1e-7)
    state = ref.metrics()
    state.update(PRED_N, NORMALS)
    assert state.compute()["mean"] == pytest.approx(0.0, abs=1e-4)
    # the default keeps pixel 1: dot 0.36 - 0.48 = -0.12 with pixel 3's 1 -> loss 1 - 0.88 / 2
    exact = build("normal")
    assert float(exact.loss(PRED_N, NORMALS)) == pytest.approx(1 - 0.88 / 2, rel=1e-6)
    state = exact.metrics()
    state.update(PRED_N, NORMALS)
    assert state.compute()["mean"] == pytest.approx((96.8922 + 0.0) / 2, abs=1e-3)  # acos(-0.12) = 96.8922 deg
