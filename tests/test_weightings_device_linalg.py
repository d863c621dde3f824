"""solver = "device" for IMTL-G, IMTL (hybrid), ConFIG and Aligned-MTL (the Jacobi
eigendecomposition of plugins/weightings/_linalg_device.py) against solver = "exact" (numpy
on the host) on random problems: K = 2..8, three seeds, near-orthogonal, conflicting and
near-collinear gradients, norm spreads up to 1e6; singular ones (identical, duplicated and
zero gradients); each method's defining property checked on the gradient vectors; a few
engine steps; resume.

Measured on an AMD EPYC (float64), as relative errors of the update d = coef @ G:
IMTL-G and ConFIG within 2e-14 of exact on near-orthogonal and conflicting gradients and
within 2e-9 on near-collinear ones (where C's condition number reaches 1e7 and the exact
path's own error is of that order: the device path's equal projections / equal cosines hold
to 1e-15 |d|, the exact path's to 2e-14); Aligned-MTL within 5e-11 (both paths within
6e-11 of a 40-digit reference). Tolerances below leave 10x or more of slack."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import no_device_sync  # noqa: E402
import test_weightings_resume as resume  # noqa: E402
from test_step_context import assert_device_solver_follows_exact  # noqa: E402
from test_weightings_solvers import KINDS, make_grads  # noqa: E402

METHODS = ["imtl_g", "imtl", "config", "aligned_mtl"]
SPREADS = [1.0, 1e3, 1e6]
SEEDS = [0, 1, 2]


def build(name, params=None, k=2, solver="exact"):
    return get_registry().get("weighting", name).build({**(params or {}), "solver": solver},
                                                       task_names=[f"t{i}" for i in range(k)])


def run(w, g):
    """The update and coefficients for float64 gradients g (numpy)."""
    k = g.shape[0]
    d = w.combine_grads(torch.from_numpy(g), {t: torch.tensor(1.0) for t in w.task_names}).numpy()
    coef = np.array([float(w.weights()[t]) for t in w.task_names])
    return d, coef


def both(name, g, params=None):
    """(d, coef) of the exact and the device solver."""
    k = g.shape[0]
    return run(build(name, params, k), g), run(build(name, params, k, "device"), g)


def tolerance(name, kind):
    if name == "aligned_mtl":
        return 1e-9
    return 1e-7 if kind == "collinear" else 1e-12


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("name", ["imtl_g", "config", "aligned_mtl"])
def test_the_device_solver_matches_the_exact_one(name, k):
    for kind in KINDS:
        for spread in SPREADS:
            for seed in SEEDS:
                g = make_grads(k, spread, kind, seed)
                (d0, c0), (d1, c1) = both(name, g)
                label = (kind, spread, seed)
                assert np.linalg.norm(d1 - d0) <= tolerance(name, kind) * np.linalg.norm(d0), label
                assert np.allclose(d1, c1 @ g, rtol=1e-12, atol=1e-12 * np.abs(c1) @ np.linalg.norm(g, axis=1))
                u = g / np.linalg.norm(g, axis=1, keepdims=True)
                if name == "imtl_g":  # equal projections on every unit gradient, alpha sums to 1
                    assert np.ptp(u @ d1) <= 1e-12 * np.linalg.norm(d1) and (u @ d1).mean() > 0, label
                    assert c1.sum() == pytest.approx(1.0, abs=1e-12)
                elif name == "config":  # equal positive cosines; |d| = sum of the projections on d
                    cos = u @ d1 / np.linalg.norm(d1)
                    assert np.ptp(cos) <= 1e-12 and cos.min() > 0, label
                    assert np.linalg.norm(d1) == pytest.approx(np.sum(g @ d1) / np.linalg.norm(d1), rel=1e-12)
                else:  # the sum of the rows of s_min U V^T (G = U S V^T) where no eigenvalue is cut
                    uu, s, vt = np.linalg.svd(g, full_matrices=False)
                    if s.min() ** 2 > 10 * k * np.finfo(np.float32).eps * s.max() ** 2:
                        ref = s.min() * (uu @ vt).sum(0)  # measured: within 8e-16 cond(M) of it
                        assert np.linalg.norm(d1 - ref) <= 1e-14 * (s.max() / s.min()) ** 2 * np.linalg.norm(ref), label


@pytest.mark.parametrize("name", ["imtl_g", "config", "aligned_mtl"])
def test_singular_gradients_give_the_exact_solvers_answer(name):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=8), rng.normal(size=8)
    cases = {
        "identical": np.stack([a, a, a]),
        "duplicated": np.stack([a, 3.0 * a, b, 0.5 * b]),  # parallel pairs: rank 2 of 4
        "zero-row": np.stack([a, np.zeros(8), b]),
        "all-zero": np.zeros((3, 8)),
    }
    for label, g in cases.items():
        (d0, c0), (d1, c1) = both(name, g)
        assert np.all(np.isfinite(c1)), label
        assert np.allclose(c1, c0, rtol=1e-12, atol=1e-12 * max(np.abs(c0).max(), 1.0)), (label, c0, c1)
        assert np.allclose(d1, d0, rtol=1e-12, atol=1e-12 * max(np.linalg.norm(d0), 1.0)), label


def test_imtl_g_device_identical_gradients_stay_finite():
    # three equal gradients: C is all ones (singular), the minimum-norm z shares equally
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    w = build("imtl_g", k=3, solver="device")
    d = w.combine_grads(g, {t: torch.tensor(1.0) for t in w.task_names})
    assert torch.allclose(d, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-14)
    assert [float(v) for v in w.weights().values()] == pytest.approx([1 / 3] * 3, rel=1e-14)


def test_config_device_preference_weights_set_the_cosine_ratios():
    g = make_grads(3, 10.0, "random", seed=5, p=12)
    (d0, _), (d1, _) = both("config", g, {"weights": [1.0, 2.0, 3.0]})
    assert np.allclose(d1, d0, rtol=1e-12, atol=1e-12 * np.linalg.norm(d0))
    cos = g @ d1 / np.linalg.norm(g, axis=1)
    assert np.allclose(cos / cos[0], [1.0, 2.0, 3.0], rtol=1e-12)


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_device_scales(scale):
    for k in (3, 4, 5):
        g = make_grads(k, 10.0, "random", seed=k, p=20)
        uu, s, vt = np.linalg.svd(g, full_matrices=False)
        sigma = {"min": s.min(), "median": np.sort(s)[(k - 1) // 2], "rmse": np.sqrt(np.mean(s ** 2))}[scale]
        (d0, _), (d1, _) = both("aligned_mtl", g, {"scale": scale})
        assert np.allclose(d1, sigma * (uu @ vt).sum(0), atol=1e-10 * s.max()), k
        assert np.allclose(d1, d0, atol=1e-10 * s.max()), k
        # rank-deficient: the first row repeated; the kept eigenvalues are the nonzero ones
        g2 = np.concatenate([g, g[:1]])
        (d0, _), (d1, _) = both("aligned_mtl", g2, {"scale": scale})
        assert np.allclose(d1, d0, atol=1e-10 * s.max()), (k, "rank-deficient")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_imtl_hybrid_device_scales_come_from_the_device(k):
    g = make_grads(k, 1e3, "conflict", seed=k)
    s = np.linspace(-1.0, 1.0, k)
    ws = [build("imtl", k=k), build("imtl", k=k, solver="device")]
    for w in ws:
        with torch.no_grad():
            w.log_scales.copy_(torch.from_numpy(s))
    (d0, c0), (d1, c1) = run(ws[0], g), run(ws[1], g)
    assert np.allclose(c1, c0, rtol=1e-11) and np.allclose(d1, d0, rtol=1e-11, atol=1e-11 * np.linalg.norm(d0))
    proj = g @ d1 / np.linalg.norm(g, axis=1)
    assert np.ptp(proj) <= 1e-12 * np.linalg.norm(d1)  # impartial on the (scaled) gradients
    assert (c1 / np.exp(s)).sum() == pytest.approx(1.0, abs=1e-12)
    # a step that leaves the first task out: the others' scales, found by position
    for w in ws:
        w.task_names = [f"t{i}" for i in range(1, k)]
    (d0, c0), (d1, c1) = run(ws[0], g[1:]), run(ws[1], g[1:])
    assert np.allclose(c1, c0, rtol=1e-11) and (c1 / np.exp(s[1:])).sum() == pytest.approx(1.0, abs=1e-12)


def test_imtl_loss_mode_refuses_the_device_solver():
    with pytest.raises(ConfigError, match="weighting 'imtl': solver applies to mode"):
        build("imtl", {"mode": "loss"}, solver="device")


@pytest.mark.parametrize("name", METHODS)
def test_engine_steps_with_the_device_solver_follow_the_exact_one(name):
    assert_device_solver_follows_exact(name, {})


@pytest.mark.parametrize("name", METHODS)
def test_device_solver_resumes_bit_identically(tmp_path, monkeypatch, name):
    monkeypatch.setitem(resume.PARAMS, name, {"solver": "device"})
    assert resume.build(tmp_path / "probe", name)[2].host_reads_per_step == 0
    resume.test_mid_epoch_resume_is_bit_identical(tmp_path, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_device_coefficients_never_synchronise_cuda(name):
    """device_coefficients on CUDA under sync debug mode "error" (a read, a blocking copy or
    boolean indexing raises), after one warm-up call; the CPU's coefficients."""
    g = make_grads(5, 1e3, "conflict", seed=0)
    m = torch.from_numpy(g @ g.T)
    w = build(name, k=5, solver="device").cuda()
    m_gpu = m.cuda()
    losses = {t: torch.tensor(1.0, device="cuda") for t in w.task_names}
    w.device_coefficients(m_gpu, losses)  # warm-up: lazy initialisation, the schedule's one copy
    with no_device_sync():
        coef = w.device_coefficients(m_gpu, losses)
    assert coef.is_cuda
    cpu = build(name, k=5, solver="device").device_coefficients(m, {t: torch.tensor(1.0) for t in w.task_names})
    assert torch.allclose(coef.cpu(), cpu, rtol=1e-12, atol=1e-14)
