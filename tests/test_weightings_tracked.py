"""MoCo, DB-MTL and ExcessMTL: methods whose P-long state carries over steps, each checked
against its update rule computed by hand (numpy, float64) over a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry

G1 = np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 2.0]])
G2 = np.array([[0.5, 1.0, -1.0], [0.0, -1.0, 1.0]])
L1, L2 = (2.0, 0.5), (1.5, 0.25)


def build(name, params=None, tasks=("a", "b")):
    return get_registry().get("weighting", name).build(params or {}, task_names=list(tasks))


def step(w, g, losses):
    return w.combine_grads(torch.from_numpy(g), {t: torch.tensor(v, dtype=torch.float64)
                                                 for t, v in zip("ab", losses)}).numpy()


# -- MoCo -------------------------------------------------------------------------------

def simplex(v):
    """Projection onto the simplex, for 2 entries: clip the equal shift."""
    x = v - (v.sum() - 1) / 2
    return np.clip(x, 0, None) / np.clip(x, 0, None).sum() if (x < 0).any() else x


@pytest.mark.parametrize("normalize", ["none", "loss"])
def test_moco_two_steps_by_hand(normalize):
    w = build("moco", {"normalize": normalize, "rho": 0.1})
    y, lam = np.zeros((2, 3)), np.array([0.5, 0.5])
    for t, (g, losses) in enumerate([(G1, L1), (G2, L2)], start=1):
        h = g if normalize == "none" else g / np.linalg.norm(g, axis=1, keepdims=True) * np.array(losses)[:, None]
        y = y - 0.5 / t**0.5 * (y - h)
        lam = simplex(lam - 0.1 / t**0.5 * (y @ y.T + 0.1 * np.eye(2)) @ lam)
        d = step(w, g, losses)
        assert np.allclose(d, lam @ y, atol=1e-12)
        assert np.allclose([w.weights()["a"], w.weights()["b"]], lam)
        assert np.allclose(w.y.numpy(), y)


def test_moco_simplex_projection():
    from mtlkit.plugins.weightings.moco import simplex_projection

    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=5) * 3
        x = simplex_projection(v)
        assert x.min() >= 0 and x.sum() == pytest.approx(1.0)
        # optimality: no other point of the simplex is closer (random candidates)
        cand = rng.dirichlet(np.ones(5), size=2000)
        assert np.linalg.norm(x - v) <= np.linalg.norm(cand - v, axis=1).min() + 1e-12


# -- DB-MTL -----------------------------------------------------------------------------

def test_db_mtl_two_steps_by_hand_and_the_balancing_property():
    w = build("db_mtl")
    ema = np.zeros((2, 3))
    for g, losses in [(G1, L1), (G2, L2)]:
        ema = 0.9 * ema + 0.1 * g / (np.array(losses)[:, None] + 1e-8)  # log-loss gradients, averaged
        norms = np.linalg.norm(ema, axis=1)
        alpha = norms.max() / (norms + 1e-8)
        d = step(w, g, losses)
        assert np.allclose(d, alpha @ ema, atol=1e-12)
        # each balanced term has the largest term's norm
        assert np.allclose(np.linalg.norm(alpha[:, None] * ema, axis=1), norms.max(), rtol=1e-6)
    # heads: the gradient of sum_k log L_k (after a step: L_k over the step's global loss, fixed)
    for _ in range(2):
        losses = {t: torch.tensor(v, dtype=torch.float64, requires_grad=True) for t, v in zip("ab", L2)}
        w.combine(losses).backward()
        assert [losses[t].grad.item() for t in "ab"] == pytest.approx([1 / L2[0], 1 / L2[1]])


def test_db_mtl_beta_sigma_decays_the_average():
    w = build("db_mtl", {"beta": 0.8, "beta_sigma": 1.0})
    ema = np.zeros((2, 3))
    for t, (g, losses) in enumerate([(G1, L1), (G2, L2)], start=1):
        b = 0.8 / t
        ema = b * ema + (1 - b) * g / (np.array(losses)[:, None] + 1e-8)
        step(w, g, losses)
    assert np.allclose(w.ema.numpy(), ema)


# -- ExcessMTL --------------------------------------------------------------------------

def test_excess_mtl_three_steps_by_hand():
    w = build("excess_mtl", {"step_size": 0.5})
    s, weights, init = np.zeros((2, 3)), np.ones(2), None
    for g, losses in [(G1, L1), (G2, L2), (G1, L2)]:
        s = s + g * g
        risk = (g * g / np.sqrt(s + 1e-7)).sum(1)
        if init is None:  # the first step only sets the reference
            init = risk
        else:
            weights = weights * np.exp(0.5 * risk / init)
            weights = 2 * weights / weights.sum()
        d = step(w, g, losses)
        assert np.allclose(d, weights @ g, atol=1e-12)
        assert np.allclose([w.weights()["a"], w.weights()["b"]], weights)
    losses = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    w.combine(losses).backward()  # heads: the same task weights
    assert [losses[t].grad.item() for t in "ab"] == pytest.approx(list(weights))


def test_tracked_state_is_json_and_buffers():
    for name in ("moco", "db_mtl", "excess_mtl"):
        w = build(name)
        step(w, G1, L1)
        assert json.loads(json.dumps(w.get_state())) == w.get_state()
        buffers = dict(w.named_buffers())
        assert any(b.shape == (2, 3) for b in buffers.values()), name  # the P-long state is a buffer


@pytest.mark.parametrize("name,params,target", [
    ("db_mtl", {}, "params"), ("excess_mtl", {}, "params"),
    ("nash_mtl", {"update_weights_every": 2}, "params"), ("nash_mtl", {"update_weights_every": 2}, "features"),
    ("nash_mtl", {"update_weights_every": 2, "max_norm": 0.5}, "params")])
def test_owned_backward_is_the_plain_step(name, params, target):
    """DB-MTL and ExcessMTL own their backward (heads' coefficients at the global loss, the
    step's new weights), and Nash-MTL between two solves (no per-task passes): a few engine
    steps equal the step written out plainly (per-task gradients, combine_grads, combine)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_step_context import TASKS, batches, build_weighting, engine_steps, reference_step
    from test_engine_common import make_model, make_tasks

    tasks, data = make_tasks(TASKS), batches(n=4)
    mine, ref = make_model(tasks, seed=1), make_model(tasks, seed=1)
    params = {**params, **({"grad_target": target} if target == "features" else {})}
    w_mine, w_ref = build_weighting(name, params, tasks), build_weighting(name, params, tasks)
    engine_steps(mine, tasks, w_mine, data)
    for b in data:
        reference_step(ref, tasks, w_ref, b, target)
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # weights() may hold 0-dim tensors (read when logged): approx compares floats
    floats = lambda w: {t: float(v) for t, v in w.weights().items()}  # noqa: E731
    assert floats(w_mine) == pytest.approx(floats(w_ref))
