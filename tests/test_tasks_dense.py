"""Dense tasks (segmentation, depth, normal): losses and whole-split metrics vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry


def build(name, **params):
    return get_registry().get("task", name).build(params, name=name)


def run_metrics(task, preds, targets, batch=None):
    """Feed ``preds``/``targets`` (full tensors) in batches of ``batch`` samples."""
    state = task.metrics()
    n = preds.shape[0]
    step = batch or n
    for i in range(0, n, step):
        state.update(preds[i:i + step], targets[i:i + step])
    return state


# -- segmentation -----------------------------------------------------------------------------
def seg_data(seed=0, n=6, c=6, h=5, w=7):
    g = np.random.default_rng(seed)
    logits = g.normal(size=(n, c, h, w)).astype(np.float32)
    logits[:, c - 1] = -50.0  # class c-1: never predicted ...
    target = g.integers(-1, c - 2, size=(n, h, w))  # ... and never a target: it must not count
    # class c-2 is never a target but may be predicted: IoU 0, counted
    logp = torch.log_softmax(torch.from_numpy(logits), 1)
    return logp, torch.from_numpy(target), logits, target


def numpy_seg_metrics(logits, target, c):
    pred = logits.argmax(1)
    keep = (target >= 0) & (target < c)
    conf = np.zeros((c, c))
    np.add.at(conf, (target[keep], pred[keep]), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = [inter[k] / union[k] for k in range(c) if union[k] > 0]
    return {"miou": 100 * np.mean(iou), "pixel_acc": 100 * inter.sum() / conf.sum()}


def test_segmentation_metrics_match_numpy_and_ignore_empty_classes():
    task = build("segmentation", num_classes=6)
    logp, target, logits, target_np = seg_data()
    expected = numpy_seg_metrics(logits, target_np, 6)
    got = run_metrics(task, logp, target).compute()
    assert got["miou"] == pytest.approx(expected["miou"], rel=1e-12)
    assert got["pixel_acc"] == pytest.approx(expected["pixel_acc"], rel=1e-12)
    assert np.isfinite(got["miou"])
    assert set(got) == set(task.metrics().higher_is_better)


def test_segmentation_reference_protocol_averages_over_all_classes():
    logp, target, logits, target_np = seg_data(seed=4)
    got = run_metrics(build("segmentation", num_classes=6, protocol="reference"), logp, target).compute()
    assert np.isnan(got["miou"])  # class 5 never occurs: the reference's NaN
    full = run_metrics(build("segmentation", num_classes=5, protocol="reference"), logp[:, :5], target).compute()
    expected = numpy_seg_metrics(logits[:, :5], target_np, 5)
    assert full["miou"] == pytest.approx(expected["miou"], rel=1e-12)  # every class occurs here


def test_segmentation_metrics_do_not_depend_on_batching():
    task = build("segmentation", num_classes=6)
    logp, target, *_ = seg_data(seed=1)
    whole = run_metrics(task, logp, target)
    ones = run_metrics(task, logp, target, batch=1)
    assert torch.equal(whole.state["confusion"], ones.state["confusion"])
    assert whole.compute() == ones.compute()


def test_segmentation_states_merge_like_an_all_reduce():
    task = build("segmentation", num_classes=6)
    logp, target, *_ = seg_data(seed=2)
    a = run_metrics(task, logp[:2], target[:2])
    b = run_metrics(task, logp[2:], target[2:])
    a.merge(b)
    assert a.compute() == run_metrics(task, logp, target).compute()


def test_segmentation_loss_is_mean_nll_over_labelled_pixels():
    task = build("segmentation", num_classes=6)
    logp, target, _, target_np = seg_data(seed=3)
    lp = logp.numpy()
    n, _, h, w = lp.shape
    keep = target_np >= 0
    ii, yy, xx = np.nonzero(keep)
    expected = -lp[ii, target_np[keep], yy, xx].mean()
    assert float(task.loss(logp, target)) == pytest.approx(expected, rel=1e-5)
    # nothing labelled: zero, not NaN, and backward still works
    x = logp.clone().requires_grad_(True)
    loss = task.loss(x, torch.full_like(target, -1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(x.grad).all()


# -- depth -----------------------------------------------------------------------------------
def depth_data(seed=0, n=6, h=5, w=6):
    g = np.random.default_rng(seed)
    pred = g.uniform(0.2, 6, size=(n, 1, h, w)).astype(np.float32)
    gt = g.uniform(0.5, 5, size=(n, 1, h, w)).astype(np.float32)
    gt[g.uniform(size=gt.shape) < 0.3] = 0.0  # invalid pixels
    gt[1] = 0.0  # one sample with no valid pixel at all
    return torch.from_numpy(pred), torch.from_numpy(gt), pred.astype(np.float64), gt.astype(np.float64)


def test_depth_loss_is_l1_over_valid_pixels():
    task = build("depth")
    p, g, pn, gn = depth_data()
    valid = gn != 0
    expected = np.abs(pn - gn)[valid].sum() / valid.sum()
    assert float(task.loss(p, g)) == pytest.approx(expected, rel=1e-5)
    # targets given as B x H x W work too
    assert float(task.loss(p, g[:, 0])) == pytest.approx(expected, rel=1e-5)
    assert float(task.loss(p, torch.zeros_like(g))) == 0.0


def test_depth_exact_metrics_are_whole_split_pixel_statistics():
    task = build("depth")
    p, g, pn, gn = depth_data(seed=1)
    valid = gn != 0
    err = np.abs(pn - gn)[valid]
    expected = {"abs_err": err.mean(), "rel_err": (err / gn[valid]).mean()}
    for batch in (None, 1, 4):
        got = run_metrics(task, p, g, batch=batch).compute()
        assert got["abs_err"] == pytest.approx(expected["abs_err"], rel=1e-12)
        assert got["rel_err"] == pytest.approx(expected["rel_err"], rel=1e-12)


def test_depth_reference_protocol_is_a_mean_of_batch_means():
    task = build("depth", protocol="reference")
    p, g, pn, gn = depth_data(seed=2)
    means_abs, means_rel = [], []
    for i in range(0, 6, 2):
        v = gn[i:i + 2] != 0
        if v.sum() == 0:
            continue
        e = np.abs(pn[i:i + 2] - gn[i:i + 2])[v]
        means_abs.append(e.mean())
        means_rel.append((e / gn[i:i + 2][v]).mean())
    got = run_metrics(task, p, g, batch=2).compute()
    assert got["abs_err"] == pytest.approx(np.mean(means_abs), rel=1e-12)
    assert got["rel_err"] == pytest.approx(np.mean(means_rel), rel=1e-12)
    exact = run_metrics(build("depth"), p, g).compute()
    assert got["abs_err"] != pytest.approx(exact["abs_err"], rel=1e-6)  # batching matters there


def test_protocol_is_validated():
    with pytest.raises(ConfigError, match="protocol"):
        build("depth", protocol="per_batch")


# -- normals ---------------------------------------------------------------------------------
def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def normal_data(seed=0, n=6, h=9, w=11, spread=0.6):
    g = np.random.default_rng(seed)
    gt = unit(g.normal(size=(n, 3, h, w))).astype(np.float32)
    pred = unit(gt + spread * g.normal(size=gt.shape)).astype(np.float32)
    gt[g.uniform(size=(n, h, w))[:, None].repeat(3, 1) < 0.2] = 0.0  # invalid pixels
    gt[3] = 0.0  # no valid pixel in this sample
    return torch.from_numpy(pred), torch.from_numpy(gt), pred.astype(np.float64), gt.astype(np.float64)


def numpy_angles(pn, gn):
    valid = np.any(gn != 0, axis=1)
    dot = np.clip((pn * gn).sum(1)[valid], -1, 1)
    return np.degrees(np.arccos(dot))


def test_normal_loss_is_one_minus_mean_cosine_over_valid_pixels():
    task = build("normal")
    p, g, pn, gn = normal_data()
    valid = np.any(gn != 0, axis=1)
    expected = 1 - (pn * gn).sum(1)[valid].mean()
    assert float(task.loss(p, g)) == pytest.approx(expected, rel=1e-5)
    assert float(task.loss(p, torch.zeros_like(g))) == 0.0


def test_normal_exact_metrics_match_numpy_for_any_batching():
    task = build("normal")
    p, g, pn, gn = normal_data(seed=1)
    ang = numpy_angles(pn, gn)
    for batch in (None, 1, 4):
        got = run_metrics(task, p, g, batch=batch).compute()
        assert got["mean"] == pytest.approx(ang.mean(), rel=1e-10)
        assert abs(got["median"] - np.median(ang)) <= 0.0025 + 1e-9
        for t in (11.25, 22.5, 30):
            assert got[f"within_{t:g}"] == pytest.approx(100 * np.mean(ang < t), rel=1e-12)
    assert set(got) == set(task.metrics().higher_is_better)


@pytest.mark.parametrize("n_pixels", [4001, 4000])  # odd and even counts
def test_histogram_median_error_bound(n_pixels):
    """The median read from the 0.005-degree histogram is within 0.0025 degree."""
    task = build("normal")
    g = np.random.default_rng(n_pixels)
    worst = 0.0
    for spread in (0.05, 0.3, 2.0):  # small angles (near acos's steep end) to wide ones
        gt = unit(g.normal(size=(1, 3, 1, n_pixels)))
        pred = unit(gt + spread * g.normal(size=gt.shape))
        ang = numpy_angles(pred, gt)
        got = run_metrics(task, torch.from_numpy(pred), torch.from_numpy(gt)).compute()
        worst = max(worst, abs(got["median"] - np.median(ang)))
    assert worst <= 0.0025 + 1e-9


def test_normal_reference_protocol_averages_batch_statistics():
    task = build("normal", protocol="reference")
    p, g, pn, gn = normal_data(seed=2)
    rows = []
    for i in range(0, 6, 2):
        a = numpy_angles(pn[i:i + 2], gn[i:i + 2])
        if a.size:
            rows.append([a.mean(), np.median(a), *(100 * np.mean(a < t) for t in (11.25, 22.5, 30))])
    expected = np.mean(rows, axis=0)
    got = run_metrics(task, p, g, batch=2).compute()
    names = ["mean", "median", "within_11.25", "within_22.5", "within_30"]
    assert [got[k] for k in names] == pytest.approx(list(expected), rel=1e-10)


def test_normal_states_merge_like_an_all_reduce():
    task = build("normal")
    p, g, *_ = normal_data(seed=3)
    a = run_metrics(task, p[:3], g[:3])
    a.merge(run_metrics(task, p[3:], g[3:]))
    whole = run_metrics(task, p, g)
    for k in whole.state:
        assert torch.allclose(a.state[k], whole.state[k], rtol=1e-12, atol=0)


def test_empty_split_gives_nan_not_an_error():
    for name, params in (("segmentation", {"num_classes": 3}), ("depth", {}), ("normal", {})):
        values = build(name, **params).metrics().compute()
        assert values and all(np.isnan(v) for v in values.values())


def test_dense_losses_read_nothing_back_from_the_device(monkeypatch):
    """The engine keeps training steps on the device; the dense losses must not force a
    host read (bool/int/float/item/tolist of a tensor) either, valid pixels or none."""
    from mtlkit.plugin_manager import get_registry

    reg = get_registry()
    cases = {
        "segmentation": (torch.randn(2, 4, 6, 6).log_softmax(1), torch.randint(-1, 4, (2, 6, 6))),
        "depth": (torch.randn(2, 1, 6, 6), torch.rand(2, 1, 6, 6) * (torch.rand(2, 1, 6, 6) > 0.3)),
        "normal": (torch.nn.functional.normalize(torch.randn(2, 3, 6, 6), dim=1),
                   torch.nn.functional.normalize(torch.randn(2, 3, 6, 6), dim=1)),
    }
    params = {"segmentation": {"num_classes": 4}}
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    losses = {}
    for task, (pred, target) in cases.items():
        t = reg.get("task", task).build(params.get(task, {}), name=task)
        nothing_valid = torch.full_like(target, -1) if task == "segmentation" else torch.zeros_like(target)
        losses[task] = (t.loss(pred, target), t.loss(pred, nothing_valid))
    monkeypatch.undo()
    assert reads == []
    for task, (some, none) in losses.items():
        assert torch.isfinite(some) and float(none) == 0.0, task
