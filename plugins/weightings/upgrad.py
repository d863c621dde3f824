"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", arXiv 2406.16232, 2024; the torchjd library).

Each task gradient g_i, scaled by its preference weight w_i (default 1/K), is projected
onto the dual cone of all task gradients, {d : g_k . d >= 0 for every k}; the update is the
sum of the K projections. Every projection, hence their sum, has a non-negative inner
product with every task gradient: no task's loss increases to first order.

The projection of sum_k u_k g_k is sum_k v_k g_k with v = argmin_{v >= u} v^T M v
(M = G G^T), solved exactly on the K x K Gram matrix (``_active_set.cone_projection``); the
authors' quadprog solve with a 1e-4 ridge is replaced by that exact active-set method, so
there is no regularisation setting. ``solver = "device"`` solves the same K projections at
once on the gradients' device, reading nothing back (``_cone_device``: accelerated projected
gradient, then Lawson-Hanson rounds vectorised over the batch).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import to_device

from ._active_set import cone_projection
from ._common import GramWeighting, SolverParams
from ._cone_device import cone_projection_device


class UPGradParams(SolverParams):
    # preference weights w (one per task, in task order; None: 1/K each)
    weights: list[float] | None = None
    max_iter: int = Field(1000, ge=1)  # active-set steps at most (a safeguard: it ends in finitely many)
    device_iterations: int = Field(
        50, ge=0, description="solver = device: accelerated projected-gradient steps (5 tensor operations each) "
        "that seed the active-set rounds.")
    device_rounds: int = Field(
        10, ge=0, description="solver = device: Lawson-Hanson active-set rounds (about 50 tensor operations "
        "each); 10 reached the exact solution to rounding in every test problem up to K = 10 tasks.")


def preference(method: str, weights: list[float] | None, task_names: list[str], full: list[str]) -> np.ndarray:
    """The preference vector for the tasks ``task_names`` (a subset of ``full`` while the
    engine leaves out tasks without a gradient); None: uniform 1/K."""
    if weights is None:
        return np.full(len(task_names), 1.0 / len(task_names))
    if len(weights) != len(full):
        raise ConfigError(f"weighting '{method}': weights has {len(weights)} values for {len(full)} tasks")
    by_name = dict(zip(full, weights))
    return np.array([by_name[t] for t in task_names], dtype=np.float64)


class UPGrad(GramWeighting):
    method = "upgrad"

    def __init__(self, params: UPGradParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.all_tasks = list(self.task_names)
        self.pref = params.weights
        if self.pref is not None:
            preference(self.method, self.pref, self.all_tasks, self.all_tasks)  # checks the length
            if any(w < 0 for w in self.pref):
                raise ConfigError(f"weighting '{self.method}': weights must be >= 0, got {self.pref}")
        self.max_iter = params.max_iter
        self.device_iterations, self.device_rounds = params.device_iterations, params.device_rounds
        self.use_solver(params.solver)

    def device_rows(self) -> np.ndarray:
        """The vectors to project, one row of coefficients each: every weighted gradient w_i g_i."""
        return np.diag(preference(self.method, self.pref, self.task_names, self.all_tasks))

    def device_coefficients(self, m, losses):
        u = to_device(torch.from_numpy(self.device_rows()), m.device, torch.float64)  # host values: no read
        return cone_projection_device(m, u, self.device_iterations, self.device_rounds).sum(dim=0)

    def coefficients(self, m, extra=None):
        w = preference(self.method, self.pref, self.task_names, self.all_tasks)
        k = len(w)
        total = np.zeros(k)
        for i in range(k):
            u = np.zeros(k)
            u[i] = w[i]
            total += cone_projection(m, u, self.max_iter)
        return total


@hookimpl
def register_weightings(register):
    register(
        "upgrad",
        UPGrad,
        params=UPGradParams,
        description="UPGrad (Quinton & Rey 2024): sum of each gradient's projection onto the dual cone",
    )
