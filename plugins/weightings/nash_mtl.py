"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among task gradients.

The update d = sum_k alpha_k g_k with alpha > 0 solving (G G^T) alpha = 1 / alpha, i.e.
g_k . d = 1 / alpha_k. That equation is the stationarity condition of the strictly convex

    f(alpha) = 1/2 alpha^T M alpha - sum_k log alpha_k,   M = G G^T,

so a damped Newton method (kept inside alpha > 0) solves it, instead of the authors'
sequence of convex programs. When no direction improves every task (0 in the gradients'
convex hull) f has no minimiser; a small ridge ``ridge * mean(diag M) * I`` added to M
keeps the solution finite there and changes it negligibly elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting


class NashMTLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ridge: float = Field(1e-6, ge=0)  # relative ridge on M, see the module docstring
    max_iter: int = Field(100, ge=1)  # Newton iterations at most
    tol: float = Field(1e-10, gt=0)  # stop when the Newton decrement falls below this


def nash_weights(m: np.ndarray, ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    k = m.shape[0]
    scale = float(np.trace(m)) / k
    if scale <= 0:  # every gradient is zero: any weights give the same (zero) update
        return np.ones(k)
    # M -> M / s scales the solution by sqrt(s): solve the well-scaled problem, then undo
    mm = m / scale + ridge * np.eye(k)
    alpha = 1.0 / np.sqrt(np.maximum(np.diag(mm), 1e-300))  # exact when gradients are orthogonal

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ mm @ x) - float(np.sum(np.log(x)))

    fx = f(alpha)
    for _ in range(max_iter):
        grad = mm @ alpha - 1.0 / alpha
        hess = mm + np.diag(1.0 / alpha**2)
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement / 2 <= tol:
            break
        t = 1.0
        # stay strictly positive, then backtrack until f decreases enough (Armijo)
        while np.any(alpha - t * step <= 0):
            t *= 0.5
        while True:
            new = alpha - t * step
            f_new = f(new)
            if f_new <= fx - 0.25 * t * decrement or t < 1e-12:
                break
            t *= 0.5
        alpha, fx = new, f_new
    return alpha / np.sqrt(scale)


class NashMTL(GramWeighting):
    method = "nash_mtl"
    initial_coefficient = 1.0

    def __init__(self, params: NashMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.ridge = float(params.ridge)
        self.max_iter = params.max_iter
        self.tol = params.tol

    def coefficients(self, m, losses=None):
        return torch.from_numpy(nash_weights(m.numpy(), self.ridge, self.max_iter, self.tol))


@hookimpl
def register_weightings(register):
    register(
        "nash_mtl",
        NashMTL,
        params=NashMTLParams,
        description="Nash-MTL (Navon et al. 2022): Nash bargaining solution, (G G^T) alpha = 1/alpha",
    )
