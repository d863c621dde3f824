"""GradVac, IMTL, STCH and Nash-MTL's options against hand computations or their defining
properties (the stateful gradient methods MoCo, DB-MTL and ExcessMTL: test_weightings_tracked.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry


def build(name, params=None, tasks=("a", "b")):
    return get_registry().get("weighting", name).build(params or {}, task_names=list(tasks))


def ones(tasks):
    return {t: torch.tensor(1.0, dtype=torch.float64) for t in tasks}


def cos(x, y):
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# -- GradVac ------------------------------------------------------------------------------

def test_gradvac_raises_the_cosine_to_the_target_and_moves_the_target():
    ga, gb = np.array([1.0, 0.0, 0.0]), np.array([-0.6, 0.8, 0.0])  # cosine -0.6
    w = build("gradvac", {"beta": 0.25})
    # task a aims at 0.5 with b; b's target for a is -1, which no cosine is below
    w.set_state({"targets": {"a": {"b": 0.5}, "b": {"a": -1.0}}})
    d = w.combine_grads(torch.from_numpy(np.stack([ga, gb])), ones("ab")).numpy()
    adjusted_a = d - gb  # b is left alone, so the update is a's adjusted gradient plus g_b
    assert cos(adjusted_a, gb) == pytest.approx(0.5, abs=1e-12)
    # the targets follow the cosines seen before the adjustment
    assert w.targets["a"]["b"] == pytest.approx(0.75 * 0.5 + 0.25 * -0.6)
    assert w.targets["b"]["a"] == pytest.approx(0.75 * -1.0 + 0.25 * -0.6)


def gradvac_reference(g, orders, targets, beta):
    """Straight from the paper, on full vectors (targets: dict of dicts by index)."""
    out = np.zeros(g.shape[1])
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            phi, t = cos(gi, g[j]), targets[i][j]
            if phi < t:
                gi = gi + np.linalg.norm(gi) * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)) / (
                    np.linalg.norm(g[j]) * math.sqrt(1 - t**2)) * g[j]
            targets[i][j] = (1 - beta) * t + beta * phi
        out += gi
    return out


def test_gradvac_matches_the_vector_algorithm_over_several_steps():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    w = build("gradvac", {"beta": 0.3}, names)
    targets = {i: {j: 0.0 for j in range(4)} for i in range(4)}
    for _ in range(4):
        g = rng.normal(size=(4, 9))
        orders = {i: list(rng.permutation([j for j in range(4) if j != i])) for i in range(4)}
        w.order = lambda i: orders[i]
        d = w.combine_grads(torch.from_numpy(g), ones(names)).numpy()
        assert np.allclose(d, gradvac_reference(g, orders, targets, 0.3), atol=1e-10)


def test_gradvac_state_resumes_the_order_and_the_targets():
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = build("gradvac", {"beta": 0.5, "seed": 4}, "abc")
    for _ in range(2):
        a.combine_grads(g, ones("abc"))
    state = json.loads(json.dumps(a.get_state()))
    b = build("gradvac", {"beta": 0.5, "seed": 99}, "abc")
    b.set_state(state)
    assert all(torch.equal(a.combine_grads(g, ones("abc")), b.combine_grads(g, ones("abc"))) for _ in range(3))


def test_gradvac_with_a_task_left_out_moves_only_the_present_pairs():
    """A step over the present tasks (the engine's task_names, rows in that order) follows
    the vector algorithm with their targets; every pair involving the absent task keeps its."""
    rng = np.random.default_rng(3)
    w = build("gradvac", {"beta": 0.4, "seed": 2}, "abc")
    start = {"a": {"b": 0.3, "c": -0.2}, "b": {"a": 0.1, "c": 0.6}, "c": {"a": 0.5, "b": -0.4}}
    w.set_state({"targets": start})
    g = rng.normal(size=(2, 6))
    orders = {0: [1], 1: [0]}
    targets = {0: {1: start["a"]["c"]}, 1: {0: start["c"]["a"]}}
    w.task_names = ["a", "c"]
    w.order = lambda i: orders[i]
    d = w.combine_grads(torch.from_numpy(g), ones("ac")).numpy()
    assert np.allclose(d, gradvac_reference(g, orders, targets, 0.4), atol=1e-12)
    w.task_names = ["a", "b", "c"]
    after = w.targets
    assert after["a"]["c"] == pytest.approx(targets[0][1]) and after["c"]["a"] == pytest.approx(targets[1][0])
    assert (after["a"]["b"], after["b"]["a"], after["b"]["c"], after["c"]["b"]) == (0.3, 0.1, 0.6, -0.4)


# -- IMTL ---------------------------------------------------------------------------------

def test_imtl_l_learns_scales_that_equalise_the_scaled_losses():
    w = build("imtl", {"mode": "loss"}, "abc")
    assert w.requires_grads is None and torch.equal(w.log_scales.detach(), torch.zeros(3))
    losses = {"a": torch.tensor(4.0), "b": torch.tensor(0.25), "c": torch.tensor(1.5)}
    out = w.combine(losses)
    out.backward()
    # d/ds_k (e^s_k L_k - s_k) = e^s_k L_k - 1 at s = 0
    assert torch.allclose(w.log_scales.grad, torch.tensor([3.0, -0.75, 0.5]))
    for _ in range(60):  # plain gradient descent on the scales alone
        w.log_scales.grad = None
        w.combine(losses).backward()
        with torch.no_grad():
            w.log_scales -= 0.3 * w.log_scales.grad
    scaled = torch.stack([w.log_scales[k].exp() * losses[t] for k, t in enumerate("abc")]).detach()
    assert torch.allclose(scaled, torch.ones(3), atol=1e-5)  # the stationary point: e^s_k L_k = 1
    assert w.weights()["a"] == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_imtl_hybrid_is_impartial_on_the_scaled_gradients(k):
    names = "abcd"[:k]
    g = np.random.default_rng(k).normal(size=(k, 10))
    w = build("imtl", tasks=names)
    assert w.requires_grads == "shared"
    s = np.linspace(-1.0, 1.0, k)
    with torch.no_grad():
        w.log_scales.copy_(torch.from_numpy(s))
    d = w.combine_grads(torch.from_numpy(g), ones(names)).numpy()
    proj = g @ d / np.linalg.norm(g, axis=1)
    assert np.allclose(proj, proj[0], rtol=1e-8)  # equal projections on every unit gradient
    coef = np.array([w.weights()[t] for t in names])
    assert np.allclose(d, coef @ g)
    assert (coef / np.exp(s)).sum() == pytest.approx(1.0)  # alpha on h_k = e^s_k g_k sums to 1
    # heads and scales: the scaled losses
    losses = {t: torch.tensor(2.0, requires_grad=True) for t in names}
    w.combine(losses).backward()
    assert w.log_scales.grad.numpy() == pytest.approx(2.0 * np.exp(s) - 1.0)


# -- Nash-MTL options ---------------------------------------------------------------------

def test_nash_mtl_update_weights_every_reuses_the_last_weights():
    rng = np.random.default_rng(2)
    gs = [torch.from_numpy(rng.normal(size=(3, 8)) + 1.0) for _ in range(5)]
    every = build("nash_mtl", {"update_weights_every": 3}, "abc")
    plain = build("nash_mtl", {}, "abc")
    alphas = []
    for step, g in enumerate(gs):
        d = every.combine_grads(g, ones("abc"))
        alphas.append([every.weights()[t] for t in "abc"])
        assert torch.allclose(d, torch.tensor(alphas[-1], dtype=torch.float64) @ g)
        plain.combine_grads(g, ones("abc"))
        solved = [plain.weights()[t] for t in "abc"]
        if step % 3 == 0:
            assert alphas[-1] == solved
        else:  # the weights of the last solve, on this step's gradients
            assert alphas[-1] == alphas[-2] and alphas[-1] != solved
    # resuming mid-cycle: the next steps are the same
    state = json.loads(json.dumps(every.get_state()))
    again = build("nash_mtl", {"update_weights_every": 3}, "abc")
    again.set_state(state)
    for g in gs[:3]:
        assert torch.equal(every.combine_grads(g, ones("abc")), again.combine_grads(g, ones("abc")))


def test_nash_mtl_max_norm_clips_the_update():
    g = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)  # the update is (1, 1)
    d = build("nash_mtl", {"ridge": 0.0, "max_norm": 1.0}).combine_grads(g, ones("ab"))
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=torch.float64) / (math.sqrt(2) + 1e-6))
    d = build("nash_mtl", {"ridge": 0.0, "max_norm": 10.0}).combine_grads(g, ones("ab"))
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=torch.float64))


# -- STCH ---------------------------------------------------------------------------------

def test_smooth_tchebycheff_tends_to_the_max():
    from mtlkit.plugins.weightings.stch import smooth_tchebycheff

    v = torch.tensor([0.3, -1.2, 0.9, 0.85], dtype=torch.float64, requires_grad=True)
    for mu in [1.0, 0.1, 0.01, 1e-3]:
        s = smooth_tchebycheff(v, mu)
        assert 0.9 <= float(s.detach()) <= 0.9 + mu * math.log(4) + 1e-12
        (grad,) = torch.autograd.grad(s, v)
        assert torch.allclose(grad, torch.softmax(v.detach() / mu, 0))
    assert float(smooth_tchebycheff(v.detach(), 1e-3)) == pytest.approx(0.9, abs=1e-3)
    assert float(grad[2]) > 0.99  # the weight goes to the worst task


def test_stch_warm_up_nadir_then_the_smooth_tchebycheff_loss():
    w = build("stch", {"warmup_epochs": 1, "mu": 0.5})
    losses = {"a": torch.tensor(2.0, dtype=torch.float64), "b": torch.tensor(0.5, dtype=torch.float64)}
    for epoch in (0, 1):  # the warm-up epoch and the nadir epoch: sum of log losses
        w.on_epoch_start(epoch)
        assert float(w.combine(losses)) == pytest.approx(math.log(2.0) + math.log(0.5))
        w.on_epoch_end(epoch, {"a": 4.0, "b": 0.25} if epoch == 1 else {"a": 9.0, "b": 9.0})
    assert w.nadir == {"a": 4.0, "b": 0.25}
    w.on_epoch_start(2)
    f = [math.log(2.0 / 4.0), math.log(0.5 / 0.25)]
    expected = 2 * 0.5 * math.log(sum(math.exp(x / 0.5) for x in f))
    assert float(w.combine(losses)) == pytest.approx(expected, rel=1e-12)
    # a mid-epoch resume: the epoch and the nadir come back from the state
    again = build("stch", {"warmup_epochs": 1, "mu": 0.5})
    again.set_state(json.loads(json.dumps(w.get_state())))
    assert float(again.combine(losses)) == pytest.approx(expected, rel=1e-12)
