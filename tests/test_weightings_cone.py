"""UPGrad, DualProj, Aligned-MTL, ConFIG and FairGrad against independent computations on
the gradient vectors themselves (numpy, float64), at gradient-norm spreads up to 1e3."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

from test_weightings_solvers import make_grads


def build(name, params=None, k=2):
    return get_registry().get("weighting", name).build(params or {}, task_names=[f"t{i}" for i in range(k)])


def run(name, g, params=None):
    k = g.shape[0]
    w = build(name, params, k)
    d = w.combine_grads(torch.from_numpy(g), {f"t{i}": torch.tensor(1.0) for i in range(k)}).numpy()
    return d, np.array([w.weights()[f"t{i}"] for i in range(k)])


def dual_cone_projection(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Projection of x onto {d : g d >= 0} by enumerating the active sets (small K only)."""
    k = g.shape[0]
    best, best_dist = None, np.inf
    scale = np.linalg.norm(x) * np.linalg.norm(g, axis=1).max()
    for r in range(k + 1):
        for active in itertools.combinations(range(k), r):
            a = g[list(active)]
            d = x - a.T @ np.linalg.pinv(a @ a.T) @ (a @ x) if r else x.copy()
            if np.all(g @ d >= -1e-9 * scale) and np.linalg.norm(d - x) < best_dist:
                best, best_dist = d, np.linalg.norm(d - x)
    return best


KINDS = ["random", "conflict", "collinear"]


# -- UPGrad / DualProj --------------------------------------------------------------------

def test_upgrad_two_conflicting_tasks_is_the_mean_of_the_pcgrad_projections():
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    # g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2 - (g1.g2)/|g1|^2 g1 = (0, 1); each scaled by 1/2
    d, _ = run("upgrad", g)
    assert np.allclose(d, [0.25, 0.75])


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("spread", [1.0, 1e3])
@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_sums_the_dual_cone_projections_of_every_gradient(k, spread, kind):
    g = make_grads(k, spread, kind, seed=0, p=12)
    d, _ = run("upgrad", g)
    expected = sum(dual_cone_projection(g, g[i] / k) for i in range(k))
    scale = np.linalg.norm(g, axis=1).max()
    assert np.allclose(d, expected, atol=1e-7 * scale)
    # the defining property: no task's gradient conflicts with the update
    assert np.all(g @ d >= -1e-9 * scale * np.linalg.norm(d))


def test_upgrad_preference_weights():
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    d, _ = run("upgrad", g, {"weights": [1.0, 0.0]})
    assert np.allclose(d, dual_cone_projection(g, g[0]))
    with pytest.raises(ConfigError, match="weighting 'upgrad': weights has 3 values for 2 tasks"):
        build("upgrad", {"weights": [1.0, 1.0, 1.0]})
    with pytest.raises(ConfigError, match="weighting 'upgrad'"):
        build("upgrad", {"weights": [1.0, -1.0]})


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("spread", [1.0, 1e3])
@pytest.mark.parametrize("kind", KINDS)
def test_dualproj_projects_the_mean_onto_the_dual_cone(k, spread, kind):
    g = make_grads(k, spread, kind, seed=1, p=12)
    d, _ = run("dualproj", g)
    scale = np.linalg.norm(g, axis=1).max()
    assert np.allclose(d, dual_cone_projection(g, g.mean(0)), atol=1e-7 * scale)
    assert np.all(g @ d >= -1e-9 * scale * np.linalg.norm(d))


def test_dualproj_keeps_a_mean_that_conflicts_with_no_task():
    g = np.array([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0]])
    d, _ = run("dualproj", g)
    assert np.allclose(d, g.mean(0))


# -- Aligned-MTL --------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_aligned_mtl_sums_gradients_aligned_to_condition_number_one(k, spread):
    g = make_grads(k, spread, "random", seed=2, p=20)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    aligned = s.min() * u @ vt  # the closest matrix with orthogonal rows of equal norm, scaled
    gram = aligned @ aligned.T
    assert np.allclose(gram, s.min() ** 2 * np.eye(k), atol=1e-9 * s.max() ** 2)
    d, coef = run("aligned_mtl", g)
    assert np.allclose(d, aligned.sum(0), atol=1e-8 * s.max())
    assert np.allclose(d, coef @ g, atol=1e-8 * s.max())


def test_aligned_mtl_scales_and_rank_deficient_gradients():
    g = make_grads(3, 10.0, "random", seed=3, p=20)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    for scale, sigma in [("median", s[1]), ("rmse", np.sqrt(np.mean(s**2)))]:
        d, _ = run("aligned_mtl", g, {"scale": scale})
        assert np.allclose(d, sigma * (u @ vt).sum(0))
    # two equal gradients: rank 2, the aligned rows span it and stay finite
    g2 = np.stack([g[0], g[0], g[1]])
    d, _ = run("aligned_mtl", g2)
    assert np.isfinite(d).all() and np.linalg.norm(d) > 0


# -- ConFIG -------------------------------------------------------------------------------

def test_config_two_orthogonal_gradients_by_hand():
    # unit gradients (1,0), (0,1): U^+ 1 = (1,1), g_u = (1,1)/sqrt2; length (2 + 1)/sqrt2
    d, _ = run("config", np.array([[2.0, 0.0], [0.0, 1.0]]))
    assert np.allclose(d, [1.5, 1.5])


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("spread", [1.0, 1e3])
@pytest.mark.parametrize("kind", ["random", "conflict"])
def test_config_equal_positive_cosine_with_every_gradient(k, spread, kind):
    g = make_grads(k, spread, kind, seed=4, p=12)
    d, _ = run("config", g)
    cos = g @ d / (np.linalg.norm(g, axis=1) * np.linalg.norm(d))
    assert np.all(cos > 0) and np.allclose(cos, cos[0], rtol=1e-7)
    # its length is the sum of the gradients' projections on its direction
    assert np.linalg.norm(d) == pytest.approx(np.sum(g @ d) / np.linalg.norm(d), rel=1e-9)


def test_config_preference_weights_set_the_cosine_ratios():
    g = make_grads(3, 10.0, "random", seed=5, p=12)
    d, _ = run("config", g, {"weights": [1.0, 2.0, 3.0]})
    cos = g @ d / np.linalg.norm(g, axis=1)
    assert np.allclose(cos / cos[0], [1.0, 2.0, 3.0], rtol=1e-8)


# -- FairGrad -----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_orthogonal_gradients_closed_form(alpha):
    g = np.array([[2.0, 0.0], [0.0, 0.5]])
    d, w = run("fairgrad", g, {"alpha": alpha, "ridge": 0.0})
    expected = np.linalg.norm(g, axis=1) ** (-2 * alpha / (1 + alpha))  # |g_k|^2 w_k = w_k^(-1/alpha)
    assert np.allclose(w, expected, rtol=1e-9) and np.allclose(d, expected @ g)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("spread", [1.0, 1e2])
def test_fairgrad_solves_the_alpha_fair_equation(k, alpha, spread):
    rng = np.random.default_rng(k)
    g = make_grads(k, spread, "random", seed=6, p=12) + 0.5 * rng.normal(size=12)  # a common direction
    d, w = run("fairgrad", g, {"alpha": alpha, "ridge": 0.0})
    assert np.all(w > 0) and np.allclose(d, w @ g)
    assert np.allclose((g @ d) * w ** (1 / alpha), 1.0, atol=1e-7)  # (G G^T w)_k = w_k^(-1/alpha)


def test_fairgrad_alpha_one_is_nash_mtl():
    g = make_grads(4, 1e2, "conflict", seed=7, p=12)
    assert np.allclose(run("fairgrad", g)[0], run("nash_mtl", g)[0], rtol=1e-9)
    with pytest.raises(ConfigError, match="alpha"):
        build("fairgrad", {"alpha": 0.0})
