"""Loss-level weightings, plus a smoke test over every registered weighting.

Expected values are computed by hand or with numpy, never read back from the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mtlkit.contracts import Weighting
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry


def build(name, params=None, tasks=("a", "b")):
    return get_registry().get("weighting", name).build(params or {}, task_names=list(tasks))


def leaf_losses(values, tasks=("a", "b", "c")):
    return {t: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for t, v in zip(tasks, values)}


# -- every registered weighting ------------------------------------------------------

ALL = get_registry().names("weighting")
GRAD_LEVEL = [n for n in ALL if get_registry().get("weighting", n).factory.requires_grads is not None]


def test_the_methods_are_registered():
    for name in ["equal", "uncertainty", "dwa", "pcgrad", "rlw", "scale_invariant", "gls", "mgda", "cagrad", "imtl_g",
                 "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "config", "fairgrad", "moco", "excess_mtl",
                 "db_mtl", "gradvac", "stch", "imtl"]:
        assert name in ALL
        assert get_registry().get("weighting", name).description


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ALL)
def test_every_weighting_builds_and_combines(name, k):
    tasks = ["a", "b", "c"][:k]
    w = build(name, tasks=tasks)
    assert isinstance(w, Weighting)
    w.on_epoch_start(0)
    losses = leaf_losses([0.7, 1.3, 2.1][:k], tasks)
    out = w.combine(losses)
    assert out.dim() == 0 and torch.isfinite(out)
    grads = torch.autograd.grad(out, list(losses.values()))
    assert all(g is not None and torch.isfinite(g) for g in grads)
    # gradient-level methods that own their whole backward (GradDrop, GradNorm) have no combine_grads
    if w.requires_grads is not None and type(w).combine_grads is not Weighting.combine_grads:
        assert w.requires_grads == "shared"
        g = torch.randn(k, 11, generator=torch.Generator().manual_seed(k))
        d = w.combine_grads(g, {t: v.detach() for t, v in losses.items()})
        assert d.shape == (11,) and d.dtype == g.dtype and torch.isfinite(d).all()
    w.on_epoch_end(0, {t: float(v.detach()) for t, v in losses.items()})
    assert set(w.weights()) <= set(tasks)
    state = json.loads(json.dumps(w.get_state()))  # checkpoint state must be JSON
    w.set_state(state)


@pytest.mark.parametrize("name", GRAD_LEVEL)
def test_gradient_methods_refuse_a_single_task(name):
    with pytest.raises(ConfigError, match=rf"weighting '{name}'.*at least 2 tasks"):
        build(name, tasks=["a"])


# -- uncertainty ---------------------------------------------------------------------

def test_uncertainty_value_and_gradients_by_hand():
    w = build("uncertainty")
    assert torch.allclose(w.log_vars.detach(), torch.tensor([-0.5, -0.5]))
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([-0.5, 0.3]))
    losses = leaf_losses([2.0, 3.0])
    out = w.combine(losses)
    # 2 / (2 e^-0.5) - 0.25 + 3 / (2 e^0.3) + 0.15
    expected = math.exp(0.5) - 0.25 + 1.5 * math.exp(-0.3) + 0.15
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    # d/ds_k = -L_k / (2 e^s_k) + 1/2 ; d/dL_k = 1 / (2 e^s_k)
    assert w.log_vars.grad[0].item() == pytest.approx(-math.exp(0.5) + 0.5, rel=1e-6)
    assert w.log_vars.grad[1].item() == pytest.approx(-1.5 * math.exp(-0.3) + 0.5, rel=1e-6)
    assert losses["a"].grad.item() == pytest.approx(0.5 * math.exp(0.5), rel=1e-6)
    assert losses["b"].grad.item() == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)
    assert w.weights()["b"] == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)


def test_uncertainty_init_param_and_parameters_are_trainable():
    w = build("uncertainty", {"init": -0.7}, tasks=["a", "b", "c"])
    params = list(w.parameters())
    assert len(params) == 1 and params[0].shape == (3,) and params[0].requires_grad
    assert torch.allclose(params[0].detach(), torch.full((3,), -0.7))


def test_uncertainty_only_counts_present_tasks():
    w = build("uncertainty")
    out = w.combine(leaf_losses([4.0], ["b"]))
    assert out.item() == pytest.approx(4.0 / (2 * math.exp(-0.5)) - 0.25, rel=1e-6)
    out.backward()
    assert w.log_vars.grad[0].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncertainty_zero_loss_gives_its_log_variance_no_gradient(dtype):
    """A task with no valid target (its loss exactly 0) leaves its s_k alone: the regulariser
    s_k / 2 would otherwise pull it down by 1/2 a step. The other task's d/ds_k is the closed
    form 1/2 - L_k / (2 e^s_k)."""
    w = build("uncertainty")
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.2, -0.4]))
    losses = {t: torch.tensor(v, dtype=dtype, requires_grad=True) for t, v in (("a", 0.0), ("b", 3.0))}
    out = w.combine(losses)
    assert out.item() == pytest.approx(1.5 * math.exp(0.4) - 0.2, rel=1e-6)  # no s_a / 2 term
    out.backward()
    assert w.log_vars.grad[0].item() == 0.0
    assert w.log_vars.grad[1].item() == pytest.approx(0.5 - 1.5 * math.exp(0.4), rel=1e-6)
    assert losses["a"].grad.item() == pytest.approx(0.5 * math.exp(-0.2), rel=1e-6)  # the factor is unchanged


# -- DWA -----------------------------------------------------------------------------

HISTORY = [
    {"a": 1.0, "b": 2.0, "c": 0.5},
    {"a": 0.8, "b": 1.0, "c": 0.5},
    {"a": 0.4, "b": 0.9, "c": 0.45},
    {"a": 0.35, "b": 0.3, "c": 0.4},
    {"a": 0.3, "b": 0.29, "c": 0.2},
    {"a": 0.3, "b": 0.28, "c": 0.19},
]


def dwa_expected(history, epoch, tasks, temperature=2.0):
    """lambda_k(t) from the formula, in numpy."""
    if epoch < 2:
        return np.ones(len(tasks))
    w = np.array([history[epoch - 1][t] / history[epoch - 2][t] for t in tasks])
    e = np.exp(w / temperature)
    return len(tasks) * e / e.sum()


def test_dwa_weights_by_hand_for_two_tasks():
    w = build("dwa")  # the default temperature is the paper's T = 2 (the hand values below use it)
    seen = []
    for epoch in range(4):
        w.on_epoch_start(epoch)
        seen.append(w.weights())
        w.on_epoch_end(epoch, {t: HISTORY[epoch][t] for t in "ab"})
    assert seen[0] == {"a": 1.0, "b": 1.0} and seen[1] == {"a": 1.0, "b": 1.0}
    # epoch 2: w_a = 0.8 / 1.0, w_b = 1.0 / 2.0; lambda_a = 2 e^0.4 / (e^0.4 + e^0.25)
    lam_a = 2 * math.exp(0.4) / (math.exp(0.4) + math.exp(0.25))
    assert seen[2]["a"] == pytest.approx(lam_a, rel=1e-12)
    assert seen[2]["b"] == pytest.approx(2 - lam_a, rel=1e-12)
    # epoch 3: w_a = 0.4 / 0.8 = 0.5, w_b = 0.9 / 1.0 = 0.9
    lam_a = 2 * math.exp(0.25) / (math.exp(0.25) + math.exp(0.45))
    assert seen[3]["a"] == pytest.approx(lam_a, rel=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_three_tasks_and_combine(temperature):
    tasks = ["a", "b", "c"]
    w = build("dwa", {"temperature": temperature}, tasks=tasks)
    for epoch in range(6):
        w.on_epoch_start(epoch)
        lam = dwa_expected(HISTORY, epoch, tasks, temperature)
        assert np.allclose([w.weights()[t] for t in tasks], lam, rtol=1e-12)
        assert sum(w.weights().values()) == pytest.approx(3.0)
        losses = leaf_losses([0.5, 1.5, 2.5])
        out = w.combine(losses)
        assert out.item() == pytest.approx(float(lam @ np.array([0.5, 1.5, 2.5])), rel=1e-9)
        out.backward()
        assert losses["c"].grad.item() == pytest.approx(lam[2], rel=1e-9)
        w.on_epoch_end(epoch, HISTORY[epoch])


def test_dwa_resumed_run_continues_identically():
    tasks = ["a", "b", "c"]

    def run(w, epochs, stop_after=None):
        out = []
        for epoch in epochs:
            w.on_epoch_start(epoch)
            out.append(w.weights())
            w.on_epoch_end(epoch, HISTORY[epoch])
        return out

    full = run(build("dwa", tasks=tasks), range(6))
    first = build("dwa", tasks=tasks)
    part = run(first, range(3))
    state = json.loads(json.dumps(first.get_state()))
    second = build("dwa", tasks=tasks)
    second.set_state(state)
    assert part + run(second, range(3, 6)) == full

    # a checkpoint taken mid-epoch (after on_epoch_start) restores the current weights too
    mid = build("dwa", tasks=tasks)
    run(mid, range(3))
    mid.on_epoch_start(3)
    resumed = build("dwa", tasks=tasks)
    resumed.set_state(json.loads(json.dumps(mid.get_state())))
    assert resumed.weights() == full[3]


def test_dwa_rejects_a_non_positive_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        build("dwa", {"temperature": 0.0})
    with pytest.raises(ConfigError):
        build("dwa", {"temprature": 2.0})


# -- RLW -----------------------------------------------------------------------------

def test_rlw_weights_are_a_softmax_of_seeded_normals():
    w = build("rlw", {"seed": 7}, tasks=["a", "b", "c"])
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        z = torch.randn(3, generator=gen, dtype=torch.float64).numpy()
        expected = np.exp(z) / np.exp(z).sum()
        losses = leaf_losses([1.0, 2.0, 4.0])
        out = w.combine(losses)
        assert out.item() == pytest.approx(float(expected @ np.array([1.0, 2.0, 4.0])), rel=1e-9)
        assert np.allclose([w.weights()[t] for t in "abc"], expected, rtol=1e-12)
        out.backward()
        assert losses["b"].grad.item() == pytest.approx(expected[1], rel=1e-9)


def test_rlw_state_resumes_the_random_stream():
    w = build("rlw", {"seed": 3})
    losses = leaf_losses([1.0, 1.0], ["a", "b"])
    w.combine(losses)
    state = json.loads(json.dumps(w.get_state()))
    nxt = [w.combine(losses).item() for _ in range(3)]
    other = build("rlw", {"seed": 99})
    other.set_state(state)
    assert [other.combine(losses).item() for _ in range(3)] == nxt


# -- scale-invariant and GLS ----------------------------------------------------------

def test_scale_invariant_is_the_sum_of_log_losses():
    w = build("scale_invariant", tasks=["a", "b", "c"])
    losses = leaf_losses([2.0, 3.0, 0.5])
    out = w.combine(losses)
    assert out.item() == pytest.approx(math.log(2.0) + math.log(3.0) + math.log(0.5), rel=1e-12)
    out.backward()
    assert [losses[t].grad.item() for t in "abc"] == pytest.approx([0.5, 1 / 3, 2.0])
    assert w.weights()["c"] == pytest.approx(2.0)


def test_gls_is_the_geometric_mean():
    w = build("gls", tasks=["a", "b", "c"])
    losses = leaf_losses([2.0, 3.0, 5.0])
    out = w.combine(losses)
    gm = 30.0 ** (1 / 3)
    assert out.item() == pytest.approx(gm, rel=1e-12)
    out.backward()
    # d/dL_k (prod L)^(1/K) = GLS / (K L_k)
    assert [losses[t].grad.item() for t in "abc"] == pytest.approx([gm / 6, gm / 9, gm / 15], rel=1e-12)
    assert w.weights()["a"] == pytest.approx(gm / 6, rel=1e-12)
