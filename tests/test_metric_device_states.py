"""Metric states accumulate on the predictions' device and read nothing back per batch; their
numbers are those of an independent numpy computation (boolean selection of the valid
pixels, batch by batch, as the states did before they moved to the device), on batches
with the edge cases: no valid pixel in a batch or in an image, ignore labels, a stray
label >= C, a class absent everywhere."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import count_reads  # noqa: E402

C, CLS = 6, 4  # segmentation classes (class 5: never a target, never predicted), classification classes
THRESHOLDS = (11.25, 22.5, 30.0)
BIN_DEG = 0.005


def batches(seed: int, n: int = 5, b: int = 3, h: int = 5, w: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pd = torch.rand(b, 1, h, w, generator=g) * 5 + 0.1
        gd = (torch.rand(b, 1, h, w, generator=g) * 4 + 0.5) * (torch.rand(b, 1, h, w, generator=g) > 0.4)
        pn = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        gn = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1) * (torch.rand(b, 1, h, w, generator=g) > 0.3)
        logits = torch.randn(b, C, h, w, generator=g)
        logits[:, C - 1] = -50.0
        ts = torch.randint(-1, C - 2, (b, h, w), generator=g)  # -1: ignore; class C-2 only predicted
        if i == 1:  # nothing valid in the whole batch
            gd.zero_(), gn.zero_(), ts.fill_(-1)
        if i == 2:  # nothing valid in its first image
            gd[0], gn[0], ts[0] = 0.0, 0.0, -1
        if i == 3:  # normals that are not the zero vector but whose components sum to 0
            gn[:, :, 0, 0] = torch.tensor([0.6, -0.6, 0.0])
        if i == 4:
            ts[0, 0, 0] = C + 3  # a stray label: counted nowhere
        out.append({"depth": (pd, gd), "normal": (pn, gn), "segmentation": (logits.log_softmax(1), ts),
                    "classification": (torch.randn(b, CLS, generator=g).log_softmax(1),
                                       torch.randint(0, CLS, (b,), generator=g))})
    return out


# -- the numpy computations ------------------------------------------------------------------
def np_depth(data, protocol):
    rows = []
    for pred, gt in data:
        p, g = pred.double().numpy(), gt.double().numpy()
        v = g != 0
        err = np.abs(p[v] - g[v])
        rows.append((err.sum(), (err / g[v]).sum(), v.sum()))
    if protocol == "exact":
        a, r, n = np.sum(rows, axis=0)
        return {"abs_err": a / n, "rel_err": r / n}
    kept = [(a / n, r / n) for a, r, n in rows if n > 0]
    return dict(zip(("abs_err", "rel_err"), np.mean(kept, axis=0)))


def np_normal(data, protocol):
    angles = []
    for pred, gt in data:
        p, g = pred.double().numpy(), gt.double().numpy()
        v = g.sum(1) != 0 if protocol == "reference" else np.any(g != 0, axis=1)
        angles.append(np.degrees(np.arccos(np.clip((p * g).sum(1)[v], -1, 1))))
    stats = lambda a: [a.mean(), np.median(a), *(100 * np.mean(a < t) for t in THRESHOLDS)]  # noqa: E731
    names = ["mean", "median", *(f"within_{t:g}" for t in THRESHOLDS)]
    if protocol == "exact":
        return dict(zip(names, stats(np.concatenate(angles))))
    return dict(zip(names, np.mean([stats(a) for a in angles if a.size], axis=0)))


def np_segmentation(data, protocol):
    if protocol == "per_image_2019":
        ious, accs = [], []
        for logp, t in data:
            for p, y in zip(logp.argmax(1).numpy(), t.numpy()):
                union = np.array([((p == j) | (y == j)).sum() for j in range(C)])
                inter = np.array([((p == j) & (y == j)).sum() for j in range(C)])
                ious.append(np.mean(inter[union > 0] / union[union > 0]))
                if (y >= 0).sum():
                    accs.append((p == y).sum() / (y >= 0).sum())
        return {"miou": 100 * np.mean(ious), "pixel_acc": 100 * np.mean(accs)}
    conf = np.zeros((C, C))
    for logp, t in data:
        p, y = logp.argmax(1).numpy(), t.numpy()
        keep = (y >= 0) & (y < C)
        np.add.at(conf, (y[keep], p[keep]), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore"):
        iou = inter / union if protocol == "reference" else inter[union > 0] / union[union > 0]
    return {"miou": 100 * iou.mean(), "pixel_acc": 100 * inter.sum() / conf.sum()}


def np_classification(data, protocol):
    logp = np.concatenate([x.double().numpy() for x, _ in data])
    y = np.concatenate([t.numpy() for _, t in data])
    return {"accuracy": 100 * np.mean(logp.argmax(1) == y), "loss": -logp[np.arange(len(y)), y].mean()}


REFERENCE = {"depth": np_depth, "normal": np_normal, "segmentation": np_segmentation,
             "classification": np_classification}
CASES = [("depth", "exact"), ("depth", "reference"), ("normal", "exact"), ("normal", "reference"),
         ("segmentation", "exact"), ("segmentation", "reference"), ("segmentation", "per_image_2019"),
         ("classification", None)]


def build(name, protocol):
    params = {"segmentation": {"num_classes": C}, "classification": {"num_classes": CLS}}.get(name, {})
    if protocol:
        params = {**params, "protocol": protocol}
    return get_registry().get("task", name).build(params, name=name)


def run(name, protocol, data):
    state = build(name, protocol).metrics()
    for pred, target in data:
        state.update(pred, target)
    return state


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,protocol", CASES)
def test_states_match_numpy_on_edge_case_batches(name, protocol, seed):
    data = [b[name] for b in batches(seed)]
    got, expected = run(name, protocol, data).compute(), REFERENCE[name](data, protocol or "exact")
    assert set(got) == set(expected)
    for k, v in expected.items():
        if name == "segmentation" and protocol == "reference" and k == "miou":
            assert math.isnan(got[k])  # class C-1 occurs nowhere: the reference's NaN
        elif name == "normal" and protocol == "exact" and k == "median":
            assert abs(got[k] - v) <= BIN_DEG / 2 + 1e-9  # the histogram's median
        elif k == "loss":  # the NLL is summed in float32 per batch (as it always was)
            assert got[k] == pytest.approx(v, rel=1e-6), k
        else:
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_normal_histogram_counts_the_valid_angles_bin_by_bin():
    data = [b["normal"] for b in batches(3)]
    hist = run("normal", "exact", data).state["hist"].numpy()
    angles = np.concatenate([np.degrees(np.arccos(np.clip((p.double().numpy() * g.double().numpy()).sum(1),
                                                          -1, 1)))[np.any(g.numpy() != 0, axis=1)] for p, g in data])
    expected = np.bincount(np.minimum(np.floor(angles / BIN_DEG).astype(int), hist.size - 1), minlength=hist.size)
    np.testing.assert_array_equal(hist, expected)


@pytest.mark.parametrize("name,protocol", [c for c in CASES if c[0] != "classification"])
def test_a_batch_with_nothing_valid_changes_nothing(name, protocol):
    """The per-batch-mean protocols skip such a batch (a device-side factor, not an if)."""
    data = [b[name] for b in batches(4)]
    with_empty = run(name, protocol, data).compute()
    without = run(name, protocol, data[:1] + data[2:]).compute()
    alone = run(name, protocol, data[1:2]).compute()
    # per_image_2019 still counts the images in its mIoU (every pixel is predicted as some class)
    names = ["pixel_acc"] if protocol == "per_image_2019" else list(without)
    for k in names:
        assert with_empty[k] == pytest.approx(without[k], rel=1e-12, nan_ok=True), k
        assert math.isnan(alone[k]), k


@pytest.mark.parametrize("name,protocol", CASES)
def test_updates_read_nothing_and_states_keep_their_dtype(monkeypatch, name, protocol):
    data = [b[name] for b in batches(5)]
    state = build(name, protocol).metrics()
    dtypes = {k: v.dtype for k, v in state.state.items()}
    counts = count_reads(monkeypatch)
    for pred, target in data:
        state.update(pred, target)
    monkeypatch.undo()
    assert sum(counts.values()) == 0, counts
    assert {k: v.dtype for k, v in state.state.items()} == dtypes


@pytest.mark.parametrize("name,protocol", CASES)
def test_an_empty_state_merges_either_way(name, protocol):
    """A DDP rank without a batch keeps its fresh state: merging it changes nothing."""
    data = [b[name] for b in batches(6)]
    expected = run(name, protocol, data).compute()
    a = run(name, protocol, data)
    a.merge(build(name, protocol).metrics())
    b = build(name, protocol).metrics()
    b.merge(run(name, protocol, data))
    for got in (a.compute(), b.compute()):
        assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)


@pytest.mark.parametrize("name,protocol", CASES)
def test_states_follow_the_predictions_device(name, protocol):
    """Fed tensors on the "meta" device (shapes without values, so any read raises), every
    state moves there on the first update and stays, in its dtype: no copy to the host."""
    state = build(name, protocol).metrics()
    dtypes = {k: v.dtype for k, v in state.state.items()}
    for pred, target in [b[name] for b in batches(7, n=2)]:
        state.update(pred.to("meta"), target.to("meta"))
    assert {k: (v.device.type, v.dtype) for k, v in state.state.items()} == {k: ("meta", d) for k, d in dtypes.items()}
