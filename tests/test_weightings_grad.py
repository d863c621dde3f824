"""Gradient-level weightings against hand-computed values or independently checked properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry


def build(name, params=None, tasks=("a", "b")):
    return get_registry().get("weighting", name).build(params or {}, task_names=list(tasks))


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def names(k):
    return ["a", "b", "c", "d", "e"][:k]


def no_losses(k):
    return {t: torch.tensor(1.0) for t in names(k)}


def random_grads(k, p, seed):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- PCGrad --------------------------------------------------------------------------

def test_pcgrad_two_tasks_by_hand():
    g = t64([[1.0, 0.0], [-1.0, 1.0]])
    # g1.g2 = -1: g1' = g1 + g2 / 2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1)
    d = build("pcgrad").combine_grads(g, no_losses(2))
    assert torch.allclose(d, t64([0.5, 1.5]))
    d = build("pcgrad", {"reduction": "mean"}).combine_grads(g, no_losses(2))
    assert torch.allclose(d, t64([0.25, 0.75]))


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    g = t64([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]])
    assert torch.allclose(build("pcgrad").combine_grads(g, no_losses(2)), g.sum(0))


def test_pcgrad_three_tasks_by_hand_with_a_fixed_order():
    g = t64([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    w = build("pcgrad", tasks=names(3))
    # task 0, order (1, 2): (1,0) -> (0.5,0.5) [vs g1] -> (0.5,0) [vs g2, dot -0.5]
    # task 1, order (0, 2): (-1,1) -> (0,1) [vs g0] -> (0,0) [vs g2, dot -1]
    # task 2, order (0, 1): (0,-1) unchanged [dot 0] -> (-0.5,-0.5) [vs g1, dot -1]
    w.projection_order = lambda i: {0: [1, 2], 1: [0, 2], 2: [0, 1]}[i]
    assert torch.allclose(w.combine_grads(g, no_losses(3)), t64([0.0, -0.5]))
    # the order matters: task 0 visiting task 2 first stays at (0.5, 0.5)
    w.projection_order = lambda i: {0: [2, 1], 1: [0, 2], 2: [0, 1]}[i]
    assert torch.allclose(w.combine_grads(g, no_losses(3)), t64([0.0, 0.0]))


def pcgrad_reference(g: np.ndarray, orders) -> np.ndarray:
    """Straight from the paper, on full vectors."""
    out = np.zeros(g.shape[1])
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def test_pcgrad_matches_the_vector_algorithm_on_random_gradients():
    rng = np.random.default_rng(0)
    for k in (3, 4, 5):
        g = rng.normal(size=(k, 40))
        orders = {i: list(rng.permutation([j for j in range(k) if j != i])) for i in range(k)}
        w = build("pcgrad", tasks=names(k))
        w.projection_order = lambda i: orders[i]
        d = w.combine_grads(torch.from_numpy(g), no_losses(k))
        assert np.allclose(d.numpy(), pcgrad_reference(g, orders), atol=1e-10)


def test_pcgrad_seeded_order_and_state_resume():
    g = random_grads(4, 30, seed=1)
    a = build("pcgrad", {"seed": 5}, tasks=names(4))
    b = build("pcgrad", {"seed": 5}, tasks=names(4))
    assert torch.equal(a.combine_grads(g, no_losses(4)), b.combine_grads(g, no_losses(4)))
    state = json.loads(json.dumps(a.get_state()))
    nxt = [a.combine_grads(g, no_losses(4)) for _ in range(5)]
    c = build("pcgrad", {"seed": 123}, tasks=names(4))
    c.set_state(state)
    assert all(torch.equal(x, c.combine_grads(g, no_losses(4))) for x in nxt)


def test_pcgrad_keeps_dtype_and_rejects_bad_params():
    g = random_grads(2, 5, seed=2).float()
    assert build("pcgrad").combine_grads(g, no_losses(2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="reduction"):
        build("pcgrad", {"reduction": "max"})


# -- MGDA ----------------------------------------------------------------------------

def mgda_two(g1: np.ndarray, g2: np.ndarray) -> float:
    return float(np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 0.0], [0.0, 1.0]],  # gamma = 1/2
        [[2.0, 0.0], [-1.0, 1.0]],
        [[1.0, 0.0], [3.0, 0.0]],  # clipped to 1: g1 is the min-norm point
        [[3.0, 1.0], [1.0, 0.5]],  # clipped to 0
    ],
)
def test_mgda_two_tasks_closed_form(rows):
    g = np.array(rows)
    gamma = mgda_two(g[0], g[1])
    w = build("mgda")
    d = w.combine_grads(torch.from_numpy(g), no_losses(2))
    assert np.allclose(d.numpy(), gamma * g[0] + (1 - gamma) * g[1], atol=1e-9)
    assert w.weights()["a"] == pytest.approx(gamma, abs=1e-9)


def test_mgda_two_tasks_random_closed_form():
    rng = np.random.default_rng(3)
    for _ in range(20):
        g = rng.normal(size=(2, 7))
        gamma = mgda_two(g[0], g[1])
        d = build("mgda").combine_grads(torch.from_numpy(g), no_losses(2))
        assert np.allclose(d.numpy(), gamma * g[0] + (1 - gamma) * g[1], atol=1e-8)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_mgda_many_tasks_satisfies_the_min_norm_optimality_conditions(k):
    rng = np.random.default_rng(k)
    g = rng.normal(size=(k, 6)) + 0.3
    w = build("mgda", {"tol": 1e-12, "max_iter": 5000}, tasks=names(k))
    d = w.combine_grads(torch.from_numpy(g), no_losses(k)).numpy()
    alpha = np.array([w.weights()[t] for t in names(k)])
    assert np.all(alpha >= -1e-12) and alpha.sum() == pytest.approx(1.0)
    assert np.allclose(d, alpha @ g)
    # d is the min-norm point of the hull iff g_k . d >= |d|^2 for every k
    assert np.all(g @ d >= d @ d - 1e-6)


def test_mgda_l2_and_loss_normalisation():
    g = np.array([[4.0, 0.0], [-1.0, 1.0]])
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    gamma = mgda_two(u[0], u[1])  # weights from the unit gradients, applied to the raw ones
    d = build("mgda", {"normalization": "l2"}).combine_grads(torch.from_numpy(g), no_losses(2))
    assert np.allclose(d.numpy(), gamma * g[0] + (1 - gamma) * g[1])
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    n = g / np.array([[2.0], [0.5]])
    gamma = mgda_two(n[0], n[1])
    d = build("mgda", {"normalization": "loss"}).combine_grads(torch.from_numpy(g), losses)
    assert np.allclose(d.numpy(), gamma * g[0] + (1 - gamma) * g[1])
    n = g / (np.array([[2.0], [0.5]]) * np.linalg.norm(g, axis=1, keepdims=True))
    gamma = mgda_two(n[0], n[1])
    d = build("mgda", {"normalization": "loss+"}).combine_grads(torch.from_numpy(g), losses)
    assert np.allclose(d.numpy(), gamma * g[0] + (1 - gamma) * g[1])


# -- CAGrad --------------------------------------------------------------------------

@pytest.mark.parametrize("rescale", ["none", "1+c^2", "1+c"])
def test_cagrad_c_zero_is_the_mean_gradient(rescale):
    g = random_grads(3, 9, seed=4)
    d = build("cagrad", {"c": 0.0, "rescale": rescale}, tasks=names(3)).combine_grads(g, no_losses(3))
    assert torch.allclose(d, g.mean(0))


def cagrad_grid(g: np.ndarray, c: float) -> np.ndarray:
    """2 tasks: minimise the dual on a fine grid of w = (x, 1 - x), then build d (no rescale)."""
    g0 = g.mean(0)
    x = np.linspace(0.0, 1.0, 200001)[:, None]
    gw = x * g[0] + (1 - x) * g[1]
    f = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1)
    best = gw[np.argmin(f)]
    return g0 + c * np.linalg.norm(g0) * best / np.linalg.norm(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_two_tasks_matches_a_grid_search(seed, c):
    g = np.random.default_rng(seed).normal(size=(2, 5))
    g[1] -= 0.8 * g[0]  # make them conflict
    expected = cagrad_grid(g, c) / (1 + c**2)
    d = build("cagrad", {"c": c}).combine_grads(torch.from_numpy(g), no_losses(2)).numpy()
    assert np.allclose(d, expected, atol=1e-4 * np.linalg.norm(expected))


@pytest.mark.parametrize("spread", [1.0, 20.0])
def test_cagrad_three_tasks_solves_the_primal_problem(spread):
    rng = np.random.default_rng(7)
    g = rng.normal(size=(3, 3))
    g[0] *= spread  # very different gradient norms must not change the answer's quality
    c = 0.4
    d = build("cagrad", {"c": c, "rescale": "none"}, tasks=names(3)).combine_grads(
        torch.from_numpy(g), no_losses(3)
    ).numpy()
    g0 = g.mean(0)
    radius = c * np.linalg.norm(g0)
    # d lies on the ball |d - g0| = c |g0| ...
    assert np.linalg.norm(d - g0) == pytest.approx(radius, rel=1e-6)
    # ... and no point of the ball has a better worst-case improvement min_i g_i . d
    dirs = rng.normal(size=(200000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    candidates = g0 + radius * dirs
    best_sampled = (candidates @ g.T).min(1).max()
    achieved = (g @ d).min()
    assert achieved >= best_sampled - 1e-9
    assert achieved - best_sampled < 1e-3 * np.abs(g @ g0).max()


def test_cagrad_rescale_divides_the_update():
    g = random_grads(2, 6, seed=5)
    raw = build("cagrad", {"rescale": "none"}).combine_grads(g, no_losses(2))
    assert torch.allclose(build("cagrad").combine_grads(g, no_losses(2)), raw / 1.16)
    assert torch.allclose(build("cagrad", {"rescale": "1+c"}).combine_grads(g, no_losses(2)), raw / 1.4)
    with pytest.raises(ConfigError, match="c"):
        build("cagrad", {"c": -0.1})


# -- IMTL-G --------------------------------------------------------------------------

def test_imtl_g_two_tasks_by_hand():
    # g = a g1 + (1 - a) g2 = (a, 2 - 2a); equal projections on (1,0) and (0,1): a = 2/3
    g = t64([[1.0, 0.0], [0.0, 2.0]])
    w = build("imtl_g")
    d = w.combine_grads(g, no_losses(2))
    assert torch.allclose(d, t64([2 / 3, 2 / 3]))
    assert w.weights()["a"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_imtl_g_equal_projections_on_unit_gradients(k):
    g = np.random.default_rng(10 + k).normal(size=(k, 12))
    w = build("imtl_g", tasks=names(k))
    d = w.combine_grads(torch.from_numpy(g), no_losses(k)).numpy()
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    proj = u @ d
    assert np.allclose(proj, proj[0], rtol=1e-8, atol=1e-10)
    alpha = np.array([w.weights()[t] for t in names(k)])
    assert alpha.sum() == pytest.approx(1.0)
    assert np.allclose(d, alpha @ g)


def test_imtl_g_identical_gradients_stay_finite():
    g = t64([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    d = build("imtl_g", tasks=names(3)).combine_grads(g, no_losses(3))
    assert torch.allclose(d, t64([1.0, 2.0]))


# -- Nash-MTL ------------------------------------------------------------------------

def test_nash_mtl_orthogonal_gradients_by_hand():
    # G G^T = diag(4, 0.25): alpha_k^2 |g_k|^2 = 1, alpha = (1/2, 2), d = g1/2 + 2 g2 = (1, 1)
    g = t64([[2.0, 0.0], [0.0, 0.5]])
    w = build("nash_mtl", {"ridge": 0.0})
    assert torch.allclose(w.combine_grads(g, no_losses(2)), t64([1.0, 1.0]))
    assert w.weights()["b"] == pytest.approx(2.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_nash_mtl_solves_the_bargaining_equation(k):
    rng = np.random.default_rng(20 + k)
    g = rng.normal(size=(k, 10)) + 1.0  # a common positive component: a solution exists
    w = build("nash_mtl", {"ridge": 0.0}, tasks=names(k))
    d = w.combine_grads(torch.from_numpy(g), no_losses(k)).numpy()
    alpha = np.array([w.weights()[t] for t in names(k)])
    assert np.all(alpha > 0)
    assert np.allclose(d, alpha @ g)
    # g_k . d = 1 / alpha_k
    assert np.allclose((g @ d) * alpha, 1.0, atol=1e-8)


def test_nash_mtl_opposite_gradients_stay_finite():
    g = t64([[1.0, 0.0], [-1.0, 0.0]])
    d = build("nash_mtl").combine_grads(g, no_losses(2))
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl"])
def test_zero_and_half_precision_gradients(name):
    w = build(name, tasks=names(3))
    assert w.requires_grads == "shared"
    d = w.combine_grads(torch.zeros(3, 8), no_losses(3))
    assert d.shape == (8,) and torch.isfinite(d).all()
    g = random_grads(3, 8, seed=9).to(torch.bfloat16)
    d = w.combine_grads(g, no_losses(3))
    assert d.dtype == torch.bfloat16 and torch.isfinite(d).all()
