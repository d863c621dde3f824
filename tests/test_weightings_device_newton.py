"""solver = "device" for Nash-MTL and FairGrad (the damped Newton method of
plugins/weightings/_newton_device.py) against solver = "exact" (numpy on the host) on random
problems: K = 2..8, near-orthogonal, conflicting and near-collinear gradients with norm
spreads up to 1e6, several seeds; singular ones (identical, duplicated, zero and opposite
gradients); each method's equation checked on the gradient vectors; Nash-MTL's
update_weights_every and max_norm on the device; engine steps; resume.

Measured on an AMD EPYC (float64; the default iterations, 20 for Nash-MTL, 60 for FairGrad):
Nash-MTL's coefficients within 5e-15 (relative) of the exact solver's, its objective within
2e-15; FairGrad's (alpha 0.5, 2, 5) within 4e-10, the update within 6e-11, the objective
within 2e-15 (both solvers stop at the tolerance 1e-10 of the equation's residual, at
different iterates); the equations' residuals below 1.1e-9 on the gradient vectors, as the
exact solver's. The tolerances below leave 100x or more of slack (for the coefficients,
room for the two solvers stopping at different iterates on another CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import no_device_sync  # noqa: E402
import test_weightings_reads as reads  # noqa: E402
import test_weightings_resume as resume  # noqa: E402
from test_step_context import assert_device_solver_follows_exact  # noqa: E402
from test_weightings_solvers import KINDS, make_grads  # noqa: E402

SPREADS = [1.0, 1e3, 1e6]
RIDGE = 1e-6  # both methods' default


def build(name, params=None, k=2, solver="exact"):
    return get_registry().get("weighting", name).build({**(params or {}), "solver": solver},
                                                       task_names=[f"t{i}" for i in range(k)])


def run(w, g):
    """The update and the coefficients (as floats) for float64 gradients g (numpy)."""
    d = w.combine_grads(torch.from_numpy(g), {t: torch.tensor(1.0) for t in w.task_names}).numpy()
    return d, np.array([float(w.weights()[t]) for t in w.task_names])


def both(name, g, params=None):
    """(d, coef) of the exact and of the device solver."""
    k = g.shape[0]
    return run(build(name, params, k), g), run(build(name, params, k, "device"), g)


def objective(a, g, power, ridge):
    """f(beta) of the normalised problem (beta = |g| a), from the gradient vectors."""
    n = np.linalg.norm(g, axis=1)
    beta = a * n
    quad = 0.5 * np.sum((beta @ (g / n[:, None])) ** 2) + 0.5 * ridge * beta @ beta
    if power == 1.0:
        return quad - np.log(beta).sum()
    return quad - np.sum(n ** (power - 1) * beta ** (1 - power)) / (1 - power)


def residual(a, g, power, ridge):
    """a_k^power (g_k . d) - 1 moved by the ridge's exact shift (see nash_mtl): 0 at the solution."""
    n = np.linalg.norm(g, axis=1)
    return a ** power * (g @ (a @ g)) - 1.0 + ridge * (a * n) ** (1 + power) * n ** (1 - power)


def check_against_exact(name, params, power, k, seeds, coef_tol):
    for kind in KINDS:
        for spread in SPREADS:
            for seed in seeds:
                g = make_grads(k, spread, kind, seed)
                (d0, c0), (d1, c1) = both(name, g, params)
                label = (kind, spread, seed)
                assert np.all(c1 > 0), label
                assert np.abs(c1 / c0 - 1).max() <= coef_tol, (label, np.abs(c1 / c0 - 1).max())
                assert np.linalg.norm(d1 - d0) <= coef_tol * np.linalg.norm(d0), label
                f0, f1 = objective(c0, g, power, RIDGE), objective(c1, g, power, RIDGE)
                assert f1 - f0 <= 1e-12 * (1 + abs(f0)), (label, f1 - f0)
                assert np.abs(residual(c1, g, power, RIDGE)).max() <= 1e-7, label
                assert np.allclose(d1, c1 @ g, rtol=1e-12, atol=1e-12 * np.abs(c1) @ np.linalg.norm(g, axis=1))


@pytest.mark.parametrize("k", range(2, 9))
def test_nash_mtl_device_solver_matches_the_exact_one(k):
    check_against_exact("nash_mtl", {}, 1.0, k, [0, 1, 2], coef_tol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
def test_fairgrad_device_solver_matches_the_exact_one(alpha, k):
    check_against_exact("fairgrad", {"alpha": alpha}, 1.0 / alpha, k, [0, 1], coef_tol=1e-7)


@pytest.mark.parametrize("name,params", [("nash_mtl", {}), ("fairgrad", {"alpha": 2.0}),
                                         ("fairgrad", {"alpha": 0.5})])
def test_without_the_ridge_the_equation_holds_to_rounding(name, params):
    power = 1.0 / params.get("alpha", 1.0)
    for k in (3, 6):
        for kind in KINDS:
            g = make_grads(k, 1e3, kind, seed=4)
            (_, c0), (_, c1) = both(name, g, {**params, "ridge": 0.0})
            assert np.abs(residual(c1, g, power, 0.0)).max() <= 1e-8, (k, kind)
            assert np.abs(c1 / c0 - 1).max() <= 1e-7, (k, kind)


@pytest.mark.parametrize("name,params", [("nash_mtl", {}), ("fairgrad", {"alpha": 2.0}),
                                         ("fairgrad", {"alpha": 0.5})])
def test_singular_gradients_give_the_exact_solvers_answer(name, params):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=8), rng.normal(size=8)
    cases = {
        "identical": np.stack([a, a, a]),
        "duplicated": np.stack([a, 3.0 * a, b, 0.5 * b]),  # parallel pairs: rank 2 of 4
        "zero-row": np.stack([a, np.zeros(8), b]),  # a zero gradient keeps weight 1
        "all-zero": np.zeros((3, 8)),
        "opposite": np.stack([a, -a]),  # no solution without the ridge: the ridge bounds alpha
        "opposite-spread": np.array([[1e6, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1e3, 0.0]]),
    }
    for label, g in cases.items():
        (d0, c0), (d1, c1) = both(name, g, params)
        assert np.all(np.isfinite(c1)) and np.all(c1 > 0), label
        assert np.allclose(c1, c0, rtol=1e-9, atol=0.0), (label, c0, c1)
        assert np.allclose(d1, d0, rtol=1e-9, atol=1e-9 * np.abs(c0) @ np.linalg.norm(g, axis=1)), label
    assert np.array_equal(both(name, cases["zero-row"], params)[1][1][1:2], [1.0])


def test_the_device_solver_keeps_its_coefficients_on_the_device():
    g = torch.from_numpy(make_grads(3, 10.0, "conflict", seed=1))
    for name in ("nash_mtl", "fairgrad"):
        w = build(name, k=3, solver="device")
        assert w.host_reads_per_step == 0 and build(name, k=3).host_reads_per_step == 1
        d = w.combine_grads(g, {t: torch.tensor(1.0) for t in w.task_names})
        coef = torch.stack(list(w.weights().values()))
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in w.weights().values())
        assert coef.dtype == torch.float64 and torch.allclose(d, coef @ g, rtol=1e-12)


# -- Nash-MTL's options on the device ----------------------------------------------------

def ones(tasks):
    return {t: torch.tensor(1.0, dtype=torch.float64) for t in tasks}


def test_nash_mtl_device_update_weights_every_reuses_the_last_weights():
    rng = np.random.default_rng(2)
    gs = [torch.from_numpy(rng.normal(size=(3, 8)) + 1.0) for _ in range(5)]
    every = build("nash_mtl", {"update_weights_every": 3}, 3, "device")
    plain = build("nash_mtl", {}, 3, "device")
    alphas = []
    for step, g in enumerate(gs):
        d = every.combine_grads(g, ones(every.task_names))
        alphas.append(torch.stack(list(every.weights().values())))
        assert torch.allclose(d, alphas[-1] @ g, rtol=1e-12)
        plain.combine_grads(g, ones(plain.task_names))
        solved = torch.stack(list(plain.weights().values()))
        if step % 3 == 0:
            assert torch.equal(alphas[-1], solved)
        else:  # the weights of the last solve, on this step's gradients
            assert torch.equal(alphas[-1], alphas[-2]) and not torch.allclose(alphas[-1], solved)
    # the state is JSON, and resuming mid-cycle gives the same next steps
    state = json.loads(json.dumps(every.get_state()))
    assert state["step"] == 5 and list(state["alpha"].values()) == alphas[-1].tolist()
    again = build("nash_mtl", {"update_weights_every": 3}, 3, "device")
    again.set_state(state)
    names = every.task_names
    for g in gs[:3]:
        assert torch.equal(every.combine_grads(g, ones(names)), again.combine_grads(g, ones(names)))


def test_nash_mtl_device_max_norm_clips_the_update():
    g = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)  # the update is (1, 1)
    d = build("nash_mtl", {"ridge": 0.0, "max_norm": 1.0}, solver="device").combine_grads(g, ones(["t0", "t1"]))
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=torch.float64) / (2 ** 0.5 + 1e-6), rtol=1e-12)
    d = build("nash_mtl", {"ridge": 0.0, "max_norm": 10.0}, solver="device").combine_grads(g, ones(["t0", "t1"]))
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("params", [{"update_weights_every": 2}, {"update_weights_every": 3, "max_norm": 0.5}])
def test_nash_mtl_device_options_read_nothing(monkeypatch, params):
    counts, steps, w = reads.step_reads(monkeypatch, "nash_mtl", {**params, "solver": "device"})
    assert steps == reads.STEPS and w.host_reads_per_step == 0
    assert sum(reads.own_reads(counts).values()) == 0, dict(reads.own_reads(counts))


# -- through the engine ------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [
    ("nash_mtl", {}), ("nash_mtl", {"update_weights_every": 2}), ("nash_mtl", {"max_norm": 0.05}),
    ("nash_mtl", {"update_weights_every": 2, "grad_target": "features"}),
    ("fairgrad", {}), ("fairgrad", {"alpha": 2.0})])
def test_engine_steps_with_the_device_solver_follow_the_exact_one(name, params):
    assert_device_solver_follows_exact(name, params)


@pytest.mark.parametrize("name,params", [("nash_mtl", {"update_weights_every": 3}), ("fairgrad", {})])
def test_device_solver_resumes_bit_identically(tmp_path, monkeypatch, name, params):
    monkeypatch.setitem(resume.PARAMS, name, {**params, "solver": "device"})
    assert resume.build(tmp_path / "probe", name)[2].host_reads_per_step == 0
    resume.test_mid_epoch_resume_is_bit_identical(tmp_path, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,params", [("nash_mtl", {}), ("fairgrad", {"alpha": 2.0})])
def test_device_coefficients_never_synchronise_cuda(name, params):
    """The device solver and a Nash-MTL step between solves on CUDA under sync debug mode
    "error" (a read, a blocking copy or boolean indexing raises), after a warm-up call; the
    CPU's coefficients."""
    g = torch.from_numpy(make_grads(5, 1e3, "conflict", seed=0))
    w = build(name, {**params, "update_weights_every": 2} if name == "nash_mtl" else params, 5, "device")
    g_gpu = g.cuda()
    losses = {t: torch.tensor(1.0, device="cuda") for t in w.task_names}
    w.device_coefficients(g_gpu @ g_gpu.T, losses)  # warm-up: lazy initialisation
    with no_device_sync():
        coef = w.device_coefficients(g_gpu @ g_gpu.T, losses)
        w.combine_grads(g_gpu, losses)  # solves
        d = w.combine_grads(g_gpu, losses)  # nash_mtl: reuses the device weights
    assert coef.is_cuda and d.is_cuda
    cpu = build(name, params, 5, "device").device_coefficients(g @ g.T, {t: torch.tensor(1.0) for t in w.task_names})
    assert torch.allclose(coef.cpu(), cpu, rtol=1e-12)
