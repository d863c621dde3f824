"""Gradient-level solvers (MGDA, CAGrad, Nash-MTL, IMTL-G) when task gradient norms differ
by up to 1e6, for K = 2..10 tasks.

Each method's defining property is checked from the gradient vectors themselves (float64
dot products of the rows, not the solver's Gram matrix), and MGDA and CAGrad are compared
with an independent exact solution: an enumeration of every support set, each solved in
closed form. Tolerances leave orders of magnitude of slack over float64 rounding, so they
hold on any CPU and thread count.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry

SPREADS = [1.0, 1e2, 1e3, 1e6]  # max |g_k| / min |g_k|
KS = [2, 3, 5, 10]
KINDS = ["random", "conflict", "collinear"]
SEEDS = [0, 1, 2]


def build(name, params=None, k=2):
    return get_registry().get("weighting", name).build(params or {}, task_names=[f"t{i}" for i in range(k)])


def losses(k):
    return {f"t{i}": torch.tensor(1.0) for i in range(k)}


def make_grads(k, spread, kind, seed, p=48):
    """K x P rows: directions of the given kind, norms log-spaced from 1 to ``spread`` in random order.

    random: nearly orthogonal; conflict: a shared direction with alternating signs plus
    noise (many obtuse pairs); collinear: one direction plus 1e-3 noise.
    """
    rng = np.random.default_rng(1000 * seed + 10 * k + KINDS.index(kind))
    g = rng.normal(size=(k, p))
    base = rng.normal(size=p)
    if kind == "conflict":
        g = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None] * base + 0.5 * g
    elif kind == "collinear":
        g = base + 1e-3 * g
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g * (spread ** (rng.permutation(k) / (k - 1)))[:, None]


def run(name, g, params=None):
    """The plugin's update and reported coefficients for float64 gradients g."""
    k = g.shape[0]
    w = build(name, params, k)
    d = w.combine_grads(torch.from_numpy(g), losses(k)).numpy()
    coef = np.array([w.weights()[f"t{i}"] for i in range(k)])
    assert np.allclose(d, coef @ g, rtol=1e-12, atol=1e-12 * np.abs(coef) @ np.linalg.norm(g, axis=1))
    return d, coef


CASES = [(k, s, kind) for k in KS for s in SPREADS for kind in KINDS]


# -- MGDA: min |G^T a|^2 over the simplex -------------------------------------------

def min_norm_reference(g):
    """Min-norm point of the rows' convex hull by enumeration: on every support, the affine
    minimiser by least squares on the vectors (SVD, no Gram matrix); the shortest one with
    nonnegative weights wins. Exact for the optimal support, feasible for all others."""
    k = g.shape[0]
    best = None
    for size in range(1, k + 1):
        for idx in itertools.combinations(range(k), size):
            idx = sorted(idx, key=lambda i: np.linalg.norm(g[i]))  # shortest as base: less cancellation
            base = g[idx[0]]
            coef = np.ones(1)
            if size > 1:
                mu = np.linalg.lstsq((g[idx[1:]] - base).T, -base, rcond=None)[0]
                coef = np.concatenate([[1.0 - mu.sum()], mu])
            if coef.min() < -1e-9 * np.abs(coef).max():
                continue
            coef = np.maximum(coef, 0.0) / np.maximum(coef, 0.0).sum()
            x = coef @ g[idx]
            if best is None or x @ x < best @ best:
                best = x
    return best


@pytest.mark.parametrize("k,spread,kind", CASES)
def test_mgda_kkt_and_exact_min_norm_point(k, spread, kind):
    for seed in SEEDS:
        g = make_grads(k, spread, kind, seed)
        x, a = run("mgda", g)
        n = np.linalg.norm(g, axis=1)
        assert np.all(a >= 0) and a.sum() == pytest.approx(1.0, abs=1e-12)
        span = a @ n  # sum_k a_k |g_k| >= |x|: the size of the terms that cancel into x
        # KKT of min |x|^2 on the simplex: g_k . x >= |x|^2 for all k, = where a_k > 0.
        # Allowed: a cosine of 1e-9 (scale-free), plus float64 rounding of the dot products.
        tol = 1e-9 * n * np.linalg.norm(x) + 1e-13 * span * (n + span)
        slack = g @ x - x @ x
        assert np.all(slack >= -tol), (seed, (slack / tol).min())
        assert np.all(np.abs(slack[a > 0]) <= tol[a > 0]), (seed, np.abs(slack[a > 0] / tol[a > 0]).max())
        if k < 10 or seed == 0:  # the enumeration is 2^K solves: one seed at K = 10
            ref = min_norm_reference(g)
            assert np.linalg.norm(x - ref) <= 1e-9 * span, (seed, np.linalg.norm(x - ref) / span)


def test_mgda_ten_conflicting_tasks_do_not_stop_at_an_iteration_cap():
    # 10 tasks in 4 dimensions: the optimum has several active vertices on a flat face,
    # where Frank-Wolfe crawls; the active-set method lands on it exactly
    rng = np.random.default_rng(5)
    g = rng.normal(size=(10, 4)) + np.array([0.3, 0.0, 0.0, 0.0])
    x, a = run("mgda", g)
    ref = min_norm_reference(g)
    assert np.linalg.norm(x - ref) <= 1e-10 * np.linalg.norm(g, axis=1).max()
    assert np.all(g @ x >= x @ x - 1e-12)


# -- CAGrad: max_d min_i g_i . d over |d - g0| <= c |g0| ------------------------------

def cagrad_dual(g, w, c):
    g0 = g.mean(0)
    gw = w @ g
    return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)


def cagrad_reference(g, c):
    """min over the simplex of F(w) = g_w . g0 + r |g_w| by enumeration of supports S: on S,
    stationarity v_S + rho M_SS w_S = lam 1 (v = G g0, rho = r / |g_w|) with sum w_S = 1 and
    |g_w| = r / rho is solved in closed form (a quadratic in lam); the best candidate with
    nonnegative weights, evaluated on the vectors, is the optimum (all are upper bounds)."""
    k = g.shape[0]
    g0 = g.mean(0)
    r = c * np.linalg.norm(g0)
    best = None
    for size in range(1, k + 1):
        for idx in itertools.combinations(range(k), size):
            idx = list(idx)
            gs = g[idx]
            n = np.linalg.norm(gs, axis=1)
            corr = (gs / n[:, None]) @ (gs / n[:, None]).T  # M_SS = D C D, solved through C
            v = gs @ g0
            try:
                ai = np.linalg.solve(corr, np.stack([1.0 / n, v / n], axis=1)) / n[:, None]
            except np.linalg.LinAlgError:
                continue
            a1, av = ai[:, 0], ai[:, 1]  # M_SS^-1 1, M_SS^-1 v
            qa, qb, qc = a1.sum(), av.sum(), v @ av
            disc = qb * qb - qa * (qc - r * r)
            if not disc > 0:
                continue
            lam = (qb + np.sqrt(disc)) / qa
            w = lam * a1 - av  # = rho w_S
            if w.sum() <= 0 or w.min() < -1e-9 * np.abs(w).max():
                continue
            full = np.zeros(k)
            full[idx] = np.maximum(w, 0.0) / np.maximum(w, 0.0).sum()
            f = cagrad_dual(g, full, c)
            if best is None or f < best[0]:
                best = (f, full)
    return best


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("k,spread,kind", CASES)
def test_cagrad_duality_gap_and_exact_objective(k, spread, kind, c):
    for seed in SEEDS:
        g = make_grads(k, spread, kind, seed)
        d, coef = run("cagrad", g, {"c": c, "rescale": "none"})
        b = np.full(k, 1.0 / k)
        g0 = g.mean(0)
        r = c * np.linalg.norm(g0)
        n = np.linalg.norm(g, axis=1)
        assert np.linalg.norm(d - g0) == pytest.approx(r, rel=1e-9)  # on the ball's surface
        # coef = b + r w / |g_w|: the dual weights w the solver found
        w = (coef - b) / (coef - b).sum()
        primal = (g @ d).min()  # worst-case improvement of d, a lower bound of the optimum
        dual = cagrad_dual(g, w, c)  # an upper bound (weak duality)
        # the scale of F's terms: |g0| times the size of the gradients combined into g_w
        scale = np.linalg.norm(g0) * (w @ n)
        assert dual - primal <= 1e-9 * scale, (seed, (dual - primal) / scale)
        if k < 10 or seed == 0:  # the enumeration is 2^K solves: one seed at K = 10
            ref, _ = cagrad_reference(g, c)
            assert primal <= ref + 1e-12 * scale  # weak duality: the reference is a valid bound
            assert abs(dual - ref) <= 1e-9 * scale, (seed, (dual - ref) / scale)


# -- Nash-MTL: alpha_k (G G^T alpha)_k = 1 -------------------------------------------

@pytest.mark.parametrize("k,spread,kind", CASES)
def test_nash_mtl_bargaining_equation_at_any_spread(k, spread, kind):
    for seed in SEEDS:
        g = make_grads(k, spread, kind, seed)
        n = np.linalg.norm(g, axis=1)
        # without the ridge the equation holds to rounding (full-rank rows: a solution exists)
        d, a = run("nash_mtl", g, {"ridge": 0.0})
        assert np.all(a > 0)
        assert np.abs(a * (g @ d) - 1.0).max() <= 1e-9, seed
        # the default ridge (on the normalised matrix) moves the equation to
        # a_k (G G^T a)_k = 1 - ridge beta_k^2 with beta = a |g|: that is the exact residual,
        # never a task's scale imposed on another (1e-6 beta^2, well below 1e-4 here)
        d, a = run("nash_mtl", g)
        beta = a * n
        residual = a * (g @ d) - 1.0
        assert np.abs(residual + 1e-6 * beta**2).max() <= 1e-9, seed
        assert np.abs(residual).max() <= 1e-6 * (beta**2).max() + 1e-9 <= 1e-4


def test_nash_mtl_ridge_keeps_a_solution_finite_without_one():
    # opposite gradients 1e6 apart in norm: no direction improves both, the ridge bounds alpha
    g = np.array([[1e6, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1e3, 0.0]])
    d, a = run("nash_mtl", g)
    assert np.all(np.isfinite(a)) and np.all(a > 0) and np.all(np.isfinite(d))


# -- IMTL-G: equal projections of the update on every unit task gradient --------------

@pytest.mark.parametrize("k,spread,kind", CASES)
def test_imtl_g_equal_projections_at_any_spread(k, spread, kind):
    for seed in SEEDS:
        g = make_grads(k, spread, kind, seed)
        d, a = run("imtl_g", g)
        u = g / np.linalg.norm(g, axis=1, keepdims=True)
        proj = u @ d
        assert a.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.abs(proj - proj.mean()).max() <= 1e-11 * np.linalg.norm(d), (seed, np.ptp(proj) / np.linalg.norm(d))
        assert proj.mean() > 0  # the update improves every task equally, and does improve


# -- float32 gradients: the Gram matrix is accumulated in float64 ---------------------

def near_collinear_float32(k=2, p=20000, seed=0):
    """Rows base + 1e-3 noise, the noise orthogonal to base: the min-norm point of two rows is
    then inside their segment (gamma ~ 1/2), set by |g_1 - g_2|^2 ~ 2e-6 |g|^2."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=p)
    noise = rng.normal(size=(k, p))
    noise -= np.outer(noise @ base / (base @ base), base)
    return torch.from_numpy(base + 1e-3 * noise).float()


def test_gram_of_float32_rows_is_exact_to_float64_rounding():
    from mtlkit.plugins.weightings._common import gram

    g = near_collinear_float32(3)
    exact = g.double().numpy() @ g.double().numpy().T  # products of float32 numbers are exact in float64
    m = gram(g)
    assert m.dtype == torch.float64 and m.device.type == "cpu"
    # the differences |g_i - g_j|^2 = M_ii + M_jj - 2 M_ij are what the solvers need; they
    # are ~2e-6 of the entries, so float32 accumulation would leave one or two digits
    diff = lambda mm: mm[0, 0] + mm[1, 1] - 2 * mm[0, 1]  # noqa: E731
    assert diff(m.numpy()) == pytest.approx(diff(exact), rel=1e-6)


def test_gram_chunks_match_one_product(monkeypatch):
    from mtlkit.plugins.weightings import _common

    g = torch.randn(4, 1001, generator=torch.Generator().manual_seed(3))
    whole = _common.gram(g)
    monkeypatch.setattr(_common, "GRAM_CHUNK", 40)  # 10 columns per chunk, ragged last one
    assert torch.allclose(_common.gram(g), whole, rtol=1e-13, atol=1e-10)


def test_mgda_on_float32_near_collinear_gradients():
    g = near_collinear_float32(2)
    g64 = g.double().numpy()
    # MGDA with 2 tasks in closed form, on the float32 values themselves (exact in float64)
    diff = g64[0] - g64[1]
    gamma = np.clip((g64[1] - g64[0]) @ g64[1] / (diff @ diff), 0.0, 1.0)
    w = build("mgda", k=2)
    d = w.combine_grads(g, losses(2))
    assert d.dtype == torch.float32
    assert 0.4 < gamma < 0.6
    # float32 products summed in float32 put this 11% off (0.44 instead of 0.495)
    assert w.weights()["t0"] == pytest.approx(gamma, rel=1e-6)
