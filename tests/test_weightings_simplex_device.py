"""solver = "device" for MGDA, MGDA-UB and CAGrad (plugins/weightings/_simplex_device.py):
the same weights as the exact host solvers, found on the Gram matrix's device with no read.

The device solvers are checked against the exact ones (``_active_set.min_norm_weights``,
``cagrad.solve_dual``) on many problems: K = 2..8, norms spread up to 1e6, directions
random, conflicting, near-collinear (1e-3 and, ill-conditioned, 1e-6 noise), with identical
rows, or K points in 3 dimensions; and against each method's defining property, from the
gradient vectors themselves (float64 dot products, not the solver's Gram matrix).

Measured on an AMD EPYC (float64, CPU; the worst over these problems with 6-20 seeds): the
min-norm point within 6e-13 span of the exact one, objective gaps below 6e-16 span^2, the
weights a_k |g_k| within 1.2e-15 span (8.5e-10 at 1e-3 noise, where the weights are
ill-determined); CAGrad's update within 1.4e-12 of the exact one, relative, its dual objective
within 1.3e-14 |g0| max|g_k| of the exact one's and its duality gap below 2.2e-14 of that
(the exact solver's: 9.3e-14). At 1e-6 noise the Gram matrix's own rounding decides: the
min-norm point is 1.9e-8 span from the exact one (the device picks among candidates whose
objectives tie to rounding: sqrt(64 K eps) bounds that), CAGrad's update 1.1e-7 (the exact
one is 4e-8 from an independent reference, the device 5e-9).
The bounds below leave 10-1000x slack.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlkit.engine import Trainer
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.weightings._active_set import min_norm_weights
from mtlkit.plugins.weightings._simplex_device import MAX_TASKS, cagrad_dual_device, min_norm_weights_device
from mtlkit.plugins.weightings.cagrad import resolved_norm, solve_dual

sys.path.insert(0, str(Path(__file__).parent))
import test_weightings_resume as resume  # noqa: E402
from test_engine_common import make_data, make_model, make_tasks  # noqa: E402
from test_weightings_solvers import cagrad_dual, min_norm_reference  # noqa: E402

KINDS = ["random", "conflict", "collinear", "identical", "flat", "near"]  # near: ill-conditioned
SPREADS = [1.0, 1e3, 1e6]
SEEDS = [0, 1, 2]
TOL_X = 1e-10  # |x_device - x_exact| / span (MGDA), |d_device - d_exact| / |d_exact| (CAGrad)
TOL_D_NEAR = 2e-6  # CAGrad's at 1e-6 noise (MGDA's there: sqrt(64 K eps), see the docstring)
TOL_OBJ = 1e-12  # objective gap / span^2 (MGDA), / |g0| max |g_k| (CAGrad)
TOL_COEF = {"random": 1e-12, "conflict": 1e-12, "collinear": 1e-7}  # max |a_k - a0_k| |g_k| / span


def problem(kind: str, k: int, spread: float, seed: int, p: int = 24) -> np.ndarray:
    """K x P float64 rows of the given kind, norms log-spaced from 1 to ``spread`` in random order.

    conflict: a shared direction with alternating signs plus noise; collinear / near: one
    direction plus 1e-3 / 1e-6 noise (equal norms: the hull is a sliver, not one vertex);
    identical: rows 0 and 1 (and the last) equal; flat: K points in a 3-dimensional space."""
    rng = np.random.default_rng(10_000 * seed + 100 * k + KINDS.index(kind))
    g = rng.normal(size=(k, p))
    base = rng.normal(size=p)
    if kind == "conflict":
        g = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None] * base + 0.5 * g
    elif kind in ("collinear", "near"):
        g = base + (1e-3 if kind == "collinear" else 1e-6) * g
        spread = 1.0
    elif kind == "flat":
        g = rng.normal(size=(k, 3)) @ rng.normal(size=(3, p)) + 0.3 * base
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g = g * (spread ** (rng.permutation(k) / max(k - 1, 1)))[:, None]
    if kind == "identical":
        g[1] = g[0]
        g[-1] = g[0]
    return g


def cases():
    return [(k, kind) for k in (2, 3, 5, 8) for kind in KINDS]


# -- MGDA: the min-norm point of the hull ------------------------------------------

@pytest.mark.parametrize("k,kind", cases())
def test_min_norm_point_matches_the_exact_solver(k, kind):
    for spread in SPREADS:
        for seed in SEEDS:
            g = problem(kind, k, spread, seed)
            m = g @ g.T
            a = min_norm_weights_device(torch.from_numpy(m)).numpy()
            a0 = min_norm_weights(m)
            n = np.linalg.norm(g, axis=1)
            x, x0 = a @ g, a0 @ g
            span = a0 @ n  # sum_k a_k |g_k|: the size of the terms that cancel into x
            assert np.all(a >= 0) and a.sum() == pytest.approx(1.0, abs=1e-12)
            assert abs(x @ x - x0 @ x0) <= TOL_OBJ * span * span, (spread, seed)
            tol_x = TOL_X if kind != "near" else np.sqrt(64 * k * np.finfo(np.float64).eps)
            assert np.linalg.norm(x - x0) <= tol_x * span, (spread, seed)
            if kind in TOL_COEF:  # unique weights: compare them (as a_k |g_k|)
                assert np.abs((a - a0) * n).max() <= TOL_COEF[kind] * span, (spread, seed)
            # KKT of min |x|^2 on the simplex, from the vectors: g_k . x >= |x|^2, = where a_k > 0
            # (a cosine of 1e-9, plus float64 rounding of the dot products; 1e-6 at 1e-6 noise)
            cos = 1e-9 if kind != "near" else 1e-6
            tol = cos * n * np.linalg.norm(x) + 1e-13 * span * (n + span)
            slack = g @ x - x @ x
            assert np.all(slack >= -tol) and np.all(np.abs(slack[a > 0]) <= tol[a > 0]), (spread, seed)


@pytest.mark.parametrize("kind", ["random", "conflict", "flat"])
def test_min_norm_point_matches_an_independent_enumeration(kind):
    # the reference solves each support by least squares on the vectors (no Gram matrix)
    for k in (3, 5):
        for seed in SEEDS:
            g = problem(kind, k, 1e3, seed)
            x = min_norm_weights_device(torch.from_numpy(g @ g.T)).numpy() @ g
            ref = min_norm_reference(g)
            assert np.linalg.norm(x - ref) <= 1e-9 * np.linalg.norm(g, axis=1).max(), (k, seed)


def test_zero_points():
    g = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [0.0, 0.0]])
    a = min_norm_weights_device(torch.from_numpy(g @ g.T)).numpy()
    assert np.array_equal(a, min_norm_weights(g @ g.T)) and np.array_equal(a, [0.0, 1.0, 0.0, 0.0])
    a = min_norm_weights_device(torch.zeros(3, 3, dtype=torch.float64)).numpy()
    assert np.array_equal(a, np.full(3, 1 / 3))  # every point 0: any weights, the exact solver's


# -- CAGrad: the dual min_w g_w . g0 + r |g_w| ----------------------------------------

def cagrad_update(g: np.ndarray, c: float, device: bool) -> tuple[np.ndarray, np.ndarray]:
    """CAGrad's update g0 + c |g0| g_w / |g_w| (g0 where g_w is 0) and the dual weights w."""
    k = g.shape[0]
    m = g @ g.T
    b = np.full(k, 1.0 / k)
    if device:
        w, scale = cagrad_dual_device(torch.from_numpy(m), c)
        return (b + float(scale) * w.numpy()) @ g, w.numpy()
    w = solve_dual(m, c)
    gw = resolved_norm(m, w)
    return ((b + c * math.sqrt(b @ m @ b) / gw * w) @ g if gw > 0 else b @ g), w


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("k,kind", cases())
def test_cagrad_matches_the_exact_solver(k, kind, c):
    for spread in SPREADS:
        for seed in SEEDS:
            g = problem(kind, k, spread, seed)
            (d, w), (d0, w0) = cagrad_update(g, c, True), cagrad_update(g, c, False)
            g0 = g.mean(0)
            tol_d = TOL_X if kind != "near" else TOL_D_NEAR
            assert np.linalg.norm(d - d0) <= tol_d * np.linalg.norm(d0), (spread, seed)
            assert np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
            assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-9)  # on the ball
            # the dual objective against the exact solver's, and the duality gap to the primal
            # value of d (its worst-case improvement, a lower bound of the optimum), from the vectors
            scale = np.linalg.norm(g0) * np.linalg.norm(g, axis=1).max()
            assert abs(cagrad_dual(g, w, c) - cagrad_dual(g, w0, c)) <= TOL_OBJ * scale, (spread, seed)
            assert cagrad_dual(g, w, c) - (g @ d).min() <= TOL_OBJ * scale, (spread, seed)


def test_cagrad_degenerate_cases_keep_the_mean_gradient():
    g = torch.tensor([[1.0, 2.0, 0.5], [-1.0, -2.0, -0.5]], dtype=torch.float64)  # g0 = 0
    for m in (g @ g.T, torch.zeros(2, 2, dtype=torch.float64)):
        w, scale = cagrad_dual_device(m, 0.4)
        assert float(scale) == 0.0 and torch.isfinite(w).all()
    w = build("cagrad", {"solver": "device", "c": 0.0, "rescale": "none"}, 3)
    d = w.combine_grads(torch.randn(3, 5, dtype=torch.float64), losses(3))
    assert [float(v) for v in w.weights().values()] == [1 / 3] * 3 and d.shape == (5,)


# -- the plugins with solver = "device" ---------------------------------------------

def build(name, params, k):
    return get_registry().get("weighting", name).build(params, task_names=[f"t{i}" for i in range(k)])


def losses(k, values=None):
    return {f"t{i}": torch.tensor(1.0 if values is None else values[i]) for i in range(k)}


def run(name, params, g, loss):
    w = build(name, params, g.shape[0])
    d = w.combine_grads(torch.from_numpy(g), loss)
    coef = np.array([float(v) for v in w.weights().values()])
    return d.numpy(), coef, w


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_normalisations_on_the_device(normalization):
    for seed in SEEDS:
        g = problem("conflict", 4, 1e3, seed)
        values = [0.5, 3.0, 0.0, 40.0]  # a zero loss: that task stays unscaled, as on the host
        params = {"normalization": normalization}
        d, coef, w = run("mgda", {**params, "solver": "device"}, g, losses(4, values))
        d0, coef0, _ = run("mgda", params, g, losses(4, values))
        assert w.host_reads_per_step == 0 and all(isinstance(v, torch.Tensor) for v in w.weights().values())
        assert np.allclose(d, coef @ g, rtol=1e-12, atol=1e-12 * np.abs(d).max())
        assert np.abs((coef - coef0) * np.linalg.norm(g, axis=1)).max() <= 1e-9 * np.linalg.norm(g, axis=1).max()


def test_mgda_loss_normalisation_by_hand():
    # g / L = (1, 0), (0, 1/4): a = (1/17, 16/17) (as tests/test_weightings_reads_gram.py, on the host)
    g = np.array([[2.0, 0.0], [0.0, 2.0]])
    d, coef, _ = run("mgda", {"normalization": "loss", "solver": "device"}, g, losses(2, [2.0, 8.0]))
    assert np.allclose(coef, [1 / 17, 16 / 17], rtol=1e-12) and np.allclose(d, [2 / 17, 32 / 17], rtol=1e-12)


@pytest.mark.parametrize("name", ["mgda", "mgda_ub", "cagrad"])
def test_too_many_tasks_for_the_device_solver(name):
    build(name, {"solver": "exact"}, MAX_TASKS + 1)  # the exact solver takes any count
    with pytest.raises(ConfigError, match=f"'{name}'.*at most {MAX_TASKS} tasks, got {MAX_TASKS + 1}.*exact"):
        build(name, {"solver": "device"}, MAX_TASKS + 1)


def test_the_largest_task_count_matches_the_exact_solver():
    g = problem("conflict", MAX_TASKS, 1e2, 0)
    for name, params in (("mgda", {}), ("cagrad", {"rescale": "none"})):
        d, _, _ = run(name, {**params, "solver": "device"}, g, losses(MAX_TASKS))
        d0, _, _ = run(name, params, g, losses(MAX_TASKS))
        assert np.linalg.norm(d - d0) <= 1e-10 * np.linalg.norm(g, axis=1).max(), name


def train(name, params, steps=4):
    """A few SGD steps of a tiny three-task network; its parameters before and after, the weighting."""
    tasks = make_tasks(("shape", "colour", "size"))
    data, _ = make_data(num_train=2 * steps, num_val=1)
    model = make_model(tasks)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    weighting = get_registry().get("weighting", name).build(params, task_names=list(tasks))
    Trainer(model, tasks, [data[i] for i in range(len(data))], weighting=weighting,
            optimizer={"name": "sgd", "lr": 0.1}, quiet=True,
            training={"epochs": 1, "batch_size": 2, "log_interval": steps, "device": "cpu"}).fit()
    return start, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), weighting


@pytest.mark.parametrize("name,params", [("mgda", {"normalization": "loss+"}), ("mgda_ub", {}),
                                         ("cagrad", {"c": 0.5})])
def test_training_steps_match_the_exact_solver(name, params):
    start, exact, _ = train(name, params)
    _, device, weighting = train(name, {**params, "solver": "device"})
    assert weighting.host_reads_per_step == 0
    moved = (exact - start).abs().max()
    assert moved > 1e-3  # the steps did move the parameters
    assert (device - exact).abs().max() <= 1e-5 * moved  # float32 gradients: rounding of the weighted sum


@pytest.mark.parametrize("name", ["mgda", "cagrad"])
def test_device_solver_resumes_bit_identically(tmp_path, monkeypatch, name):
    monkeypatch.setitem(resume.PARAMS, name, {"solver": "device"})
    resume.test_mid_epoch_resume_is_bit_identical(tmp_path, name)
