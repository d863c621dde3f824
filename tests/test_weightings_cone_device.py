"""UPGrad's and DualProj's ``solver = "device"`` (plugins/weightings/_cone_device.py) against
the exact host solver (``_active_set.cone_projection``) on many problems: K = 2..8, norms
spread up to 1e3, well-conditioned, near-collinear, identical, zero, opposed near-collinear
and rank-deficient gradients. Errors are measured against s = sum_k |u_k| |g_k|, the size of
the terms the projected vector is made of, so that a vector cancelling to nearly nothing
is not held to a relative precision float64 cannot give. The defining property, a
non-negative inner product with every gradient, is checked on the gradient vectors
themselves. Tolerances leave about 1000x slack over the largest errors measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.weightings._active_set import cone_projection
from mtlkit.plugins.weightings._cone_device import cone_projection_device, fista
from mtlkit.plugins.weightings.upgrad import UPGradParams

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import no_device_sync  # noqa: E402
from test_step_context import batches, build_weighting, engine_steps  # noqa: E402
from test_engine_common import make_model, make_tasks  # noqa: E402

ITERS = UPGradParams.model_fields["device_iterations"].default
ROUNDS = UPGradParams.model_fields["device_rounds"].default
WELL = ["random", "conflict", "collinear", "identical", "zero"]
ILL = ["opposed", "lowrank"]
# (d error / s, objective gap / s^2) allowed; largest measured (AMD EPYC, float64, spreads up
# to 1e6, K up to 10): well-conditioned 5e-15, 4.3e-16; opposed / rank-deficient 2e-11, 1.2e-14
TOL = {"well": (1e-11, 1e-12), "ill": (1e-8, 1e-11)}
CONFLICT_TOL = 1e-11  # g_k . d >= -tol |g_k| s; largest measured violation 3.6e-14 (the exact solver's 5e-14)
COEF_TOL = 1e-11  # |v - v_exact|_k |g_k| <= tol s where the solution is unique; largest measured 1.5e-14


def problem(kind: str, k: int, seed: int, spread: float, p: int = 16) -> np.ndarray:
    """K x P gradients of the given kind, norms log-spaced from 1 to ``spread``.

    collinear: one direction plus 1e-3 noise; opposed: one direction with alternating signs
    plus 1e-4 noise (C's small eigenvalues near 1e-8); lowrank: rank 2; identical: rows 0
    and 1 equal; zero: row 0 is zero."""
    rng = np.random.default_rng(1000 * seed + 10 * k + (WELL + ILL).index(kind))
    g = rng.normal(size=(k, p))
    base = rng.normal(size=p)
    signs = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None]
    if kind == "conflict":
        g = signs * base + 0.5 * g
    elif kind == "collinear":
        g = base + 1e-3 * g
    elif kind == "opposed":
        g = signs * base + 1e-4 * g
    elif kind == "lowrank":
        g = rng.normal(size=(k, 2)) @ rng.normal(size=(2, p))
    elif kind == "identical":
        g[1] = g[0]
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g = g * (spread ** (rng.permutation(k) / (k - 1)))[:, None]
    if kind == "zero":
        g[0] = 0.0
    return g


def rows(k: int, seed: int) -> np.ndarray:
    """The vectors projected: UPGrad's K rows w_i e_i (w = 1/K), DualProj's mean, a random
    non-negative preference."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.eye(k) / k, np.full(k, 1.0 / k), rng.random(k)])


def device(m: np.ndarray, u: np.ndarray, iters=ITERS, rounds=ROUNDS) -> np.ndarray:
    return cone_projection_device(torch.from_numpy(m), torch.from_numpy(u), iters, rounds).numpy()


@pytest.mark.parametrize("kind", WELL + ILL)
def test_device_projection_matches_the_exact_solver(kind):
    d_tol, obj_tol = TOL["ill" if kind in ILL else "well"]
    for k in range(2, 9):
        for seed in range(3):
            for spread in (1.0, 1e3):
                g = problem(kind, k, seed, spread)
                m = g @ g.T
                n = np.linalg.norm(g, axis=1)
                u = rows(k, seed)
                got = device(m, u)
                for ui, v in zip(u, got):
                    ref = cone_projection(m, ui)
                    s = np.abs(ui) @ n
                    d, d_ref = v @ g, ref @ g
                    where = (kind, k, seed, spread, ui)
                    assert np.linalg.norm(d - d_ref) <= d_tol * s, where
                    assert abs(v @ m @ v - ref @ m @ ref) <= obj_tol * s * s, where
                    # the defining property, on the vectors: no gradient conflicts with d
                    assert np.all(g @ d >= -CONFLICT_TOL * n * s), where
                    assert np.all(v >= ui - 1e-12 * np.abs(ui)), where  # v >= u: the dual's constraint
                    if kind in ("random", "conflict"):  # a unique solution: the coefficients too
                        assert np.max(np.abs(v - ref) * n) <= COEF_TOL * s, where
                    if kind == "zero":  # a zero gradient takes no part: it keeps v_k = u_k
                        assert v[0] == ui[0], where


def test_the_iterations_alone_converge_towards_the_exact_projection():
    """No active-set round: the accelerated projected gradient (the rounds' warm start) on
    its own approaches the exact solution as its iterations grow."""
    g = problem("conflict", 6, 0, 10.0)
    m = g @ g.T
    n = np.linalg.norm(g, axis=1)
    u = rows(6, 0)
    s = np.abs(u) @ n
    ref = np.stack([cone_projection(m, ui) for ui in u]) @ g
    errors = [np.max(np.linalg.norm(device(m, u, iters, 0) @ g - ref, axis=1) / s) for iters in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def test_fista_steps_stay_feasible_and_lower_the_objective():
    g = problem("conflict", 5, 1, 1.0)
    c = torch.from_numpy(g @ g.T)
    l = torch.from_numpy(rows(5, 1))
    objective = [float(((y @ c) * y).sum()) for y in (fista(c, l, i) for i in (0, 5, 50, 500))]
    assert all(bool((fista(c, l, i) >= l).all()) for i in (1, 7, 40))
    assert objective[0] > objective[1] > objective[2] >= objective[3], objective


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("weights", [None, [0.5, 0.0, 2.0, 1.0]])
def test_the_plugin_device_solver_gives_the_exact_update(name, weights):
    g = torch.from_numpy(problem("conflict", 4, 2, 1e3))
    names = [f"t{i}" for i in range(4)]
    losses = {t: torch.tensor(1.0) for t in names}
    exact = get_registry().get("weighting", name).build({"weights": weights}, task_names=names)
    dev = get_registry().get("weighting", name).build({"weights": weights, "solver": "device"}, task_names=names)
    assert dev.host_reads_per_step == 0 and exact.host_reads_per_step == 1
    d_exact, d_dev = exact.combine_grads(g, losses), dev.combine_grads(g, losses)
    scale = float(g.norm(dim=1).sum())
    assert torch.allclose(d_dev, d_exact, rtol=0, atol=1e-11 * scale)
    w_dev = dev.weights()
    assert all(isinstance(w, torch.Tensor) for w in w_dev.values())
    assert np.allclose([float(w_dev[t]) for t in names], [exact.weights()[t] for t in names],
                       rtol=1e-9, atol=1e-12)


def test_the_device_solver_follows_the_tasks_present_in_a_step():
    """The engine leaves out tasks without a gradient by narrowing ``task_names``: the
    preference follows the present tasks, as on the exact path."""
    g = torch.from_numpy(problem("conflict", 3, 3, 1.0))
    for name in ("upgrad", "dualproj"):
        built = [get_registry().get("weighting", name).build({"weights": [1.0, 2.0, 3.0, 4.0], "solver": s},
                                                            task_names=["a", "b", "c", "d"])
                 for s in ("exact", "device")]
        outs = []
        for w in built:
            w.task_names = ["a", "c", "d"]
            outs.append(w.combine_grads(g, {t: torch.tensor(1.0) for t in w.task_names}))
        assert torch.allclose(outs[1], outs[0], rtol=0, atol=1e-12 * float(g.norm(dim=1).sum() * 4)), name


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_engine_steps_with_the_device_solver_match_the_exact_ones(name):
    tasks = make_tasks(("shape", "colour", "size"))
    data = batches()
    models = {}
    for solver in ("exact", "device"):
        models[solver] = make_model(tasks, seed=1)
        start = {k: v.detach().clone() for k, v in models[solver].named_parameters()}
        engine_steps(models[solver], tasks, build_weighting(name, {"solver": solver}, tasks), data)
    moved = max(float((p.detach() - start[k]).abs().max()) for k, p in models["device"].named_parameters())
    assert moved > 1e-3
    for (k, a), b in zip(models["device"].named_parameters(), models["exact"].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (name, k, float((a - b).abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_the_device_solver_never_synchronises_cuda(name):
    """The whole solve under torch's sync debug mode "error" (a read, a blocking copy, an
    error-flag check raises), and the CPU's result."""
    g = problem("conflict", 5, 4, 1e3)
    names = [f"t{i}" for i in range(5)]
    w_cpu, w_gpu = (get_registry().get("weighting", name).build({"solver": "device"}, task_names=names)
                    for _ in range(2))
    gpu = torch.from_numpy(g).float().cuda()
    losses = {t: torch.tensor(1.0, device="cuda") for t in names}
    w_gpu.combine_grads(gpu, losses)  # warm-up: lazy CUDA and solver-library initialisation
    with no_device_sync():
        out = w_gpu.combine_grads(gpu, losses)
    ref = w_cpu.combine_grads(torch.from_numpy(g).float(), {t: torch.tensor(1.0) for t in names})
    assert torch.allclose(out.cpu(), ref, rtol=1e-5, atol=1e-5 * float(np.linalg.norm(g, axis=1).sum()))
