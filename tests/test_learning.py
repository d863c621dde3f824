"""Learning checks: trained briefly on synthetic scenes, the architectures beat trivial
predictors (majority class, mean training depth, mean training normal), computed here with
numpy from the data set's samples. The training and the table live in
``bench/learning_check.py`` (run it for the numbers); margins below leave headroom under
the ones measured there (see its docstring for the sign convention: positive = better)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "learning_check.py"


def _bench():
    name = "mtlkit_bench_learning_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_trivial_baselines_by_hand():
    """The numpy trivial predictors on a hand-made two-sample set."""
    lc = _bench()
    seg_tr = torch.tensor([[0, 0], [0, 1]])
    seg_va = torch.tensor([[0, 1], [2, -1]])
    n_tr = torch.zeros(3, 2, 2)
    n_tr[2] = -1.0  # all facing the camera
    n_va = torch.zeros(3, 2, 2)
    n_va[0, 0, 0] = 1.0  # 90 degrees off
    n_va[2, 0, 1] = -1.0  # 0 degrees
    train = [{"segmentation": seg_tr, "depth": torch.tensor([[[1.0, 3.0], [0.0, 2.0]]]), "normal": n_tr}]
    val = [{"segmentation": seg_va, "depth": torch.tensor([[[2.0, 4.0], [0.0, 0.0]]]), "normal": n_va}]
    t = lc.trivial_baselines(train, val, num_classes=3)
    assert t["majority_class"] == 0
    assert t["pixel_acc"] == pytest.approx(100 / 3)  # one of three labelled pixels is class 0
    assert t["miou"] == pytest.approx(100 / 9)  # IoU 1/3 for class 0, 0 for classes 1 and 2
    assert t["mean_depth"] == pytest.approx(2.0)
    assert t["depth_abs"] == pytest.approx(1.0)  # |2 - 2|, |4 - 2| over two valid pixels
    assert t["normal_mean"] == pytest.approx(45.0)  # 90 and 0 degrees over two valid pixels


@pytest.fixture
def one_thread():
    """These small models train several times faster on one thread on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mtan_tiny_beats_trivial_predictors(one_thread):
    """MTAN (SegNet at 1/8 width, 32 x 48 images, 64 scenes, 192 steps of batch 2, Adam at
    lr 2e-3 decayed to 0 by a cosine) beats the majority-class pixel accuracy and the
    mean-depth abs error, on at least one of training seeds 0-3, tried in order until one
    does (one run, about 35 s, where the first seed learns).

    Why several seeds: a run lands in one of two basins. Most seeds learn (pixel accuracy
    +11 to +19 points, depth +0.08 to +0.19 m); some stay at the majority class with a depth
    head that collapses at evaluation, and which basin a seed lands in can depend on the CPU,
    because the floating-point order does. Measured on an AMD EPYC (AVX2 + FMA, no AVX-512),
    data seed 0, one thread: seeds 0-7 with ATen's AVX2 kernels all learned (smallest margins
    +11.5 points, +0.079 m); with ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41``
    (another CPU's arithmetic) seeds 0, 1 and 3 learned (+13.5 points, +0.087 m at least)
    and seed 2 did not (+2.7 points, -1.785 m). One fixed seed would therefore fail on some
    CPUs; a model that cannot learn fails on all four. The thresholds keep about half of the
    smallest learned margins. (Other data seeds are other problems: on data seed 2 depth
    stayed at the mean-depth level in every setting tried, so the data set is pinned.)"""
    lc = _bench()
    tried = []
    for seed in range(4):
        s = lc.Settings(height=32, width=48, num_train=64, num_val=32, epochs=6, batch_size=2, lr=2e-3,
                        schedule="cosine", seed=seed, data_seed=0)
        metrics, data = lc.train_one("mtan", s)
        assert all(np.isfinite(list(metrics.values())))
        m = lc.margins(metrics, lc.trivial_baselines(data[0], data[1], s.num_classes))
        tried.append((seed, round(m["pixel_acc"], 2), round(m["depth_abs"], 3)))
        if m["pixel_acc"] > 5.0 and m["depth_abs"] > 0.04:
            return
    pytest.fail(f"no training seed beat the trivial predictors (seed, pixel acc margin, depth margin): {tried}")


# minimum margins over trivial (mIoU and pixel acc in points, depth in metres, normal in
# degrees). Measured with bench/learning_check.py's defaults (lr 1e-3, cosine; the smallest
# over the eight architectures): mIoU +10.3 and pixel acc +16.2 (split_deep), depth +0.069 m
# (split_deep), normal +7.7 deg (single); the thresholds keep about half as headroom.
SLOW_MARGINS = {"miou": 5.0, "pixel_acc": 8.0, "depth_abs": 0.03, "normal_mean": 3.0}


@pytest.mark.slow
@pytest.mark.parametrize("arch", _bench().ARCHS if BENCH.is_file() else [])
def test_every_architecture_beats_trivial_predictors(arch, trivial_and_data, one_thread):
    """On the first of training seeds 0-2 that learns (see the tiny test above for why one
    seed is not enough: under ``ATEN_CPU_CAPABILITY=default`` split_wide's seed 0 stayed at
    the majority class and the mean depth on the AMD EPYC, where AVX2 kernels learn it)."""
    lc = _bench()
    trivial, data = trivial_and_data
    tried = []
    for seed in range(3):
        metrics, _ = lc.train_one(arch, lc.Settings(seed=seed), data)
        m = lc.margins(metrics, trivial)
        failures = [f"{key} margin {m[key]:.3f} <= {need}" for key, need in SLOW_MARGINS.items() if not m[key] > need]
        if not failures:
            return
        tried.append((seed, failures))
    pytest.fail(f"{arch}: no training seed beat the trivial predictors: {tried} (trivial {trivial})")


@pytest.fixture(scope="module")
def trivial_and_data():
    lc = _bench()
    s = lc.Settings()
    data = lc.render_data(s)
    return lc.trivial_baselines(data[0], data[1], s.num_classes), data
