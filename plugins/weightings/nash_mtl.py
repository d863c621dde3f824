"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among task gradients.

The update d = sum_k alpha_k g_k with alpha > 0 solving (G G^T) alpha = 1 / alpha, i.e.
g_k . d = 1 / alpha_k. That equation is the stationarity condition of the strictly convex

    f(alpha) = 1/2 alpha^T M alpha - sum_k log alpha_k,   M = G G^T,

so a damped Newton method (kept inside alpha > 0) solves it, instead of the authors'
sequence of convex programs.

It is solved in the normalised space: with n_k = |g_k| and beta = n * alpha the equation
reads beta_k (C beta)_k = 1 for the correlation matrix C = M / (n n^T), and alpha = beta / n
solves the original one exactly. C has a unit diagonal whatever the norms, so the Newton
steps are as accurate at a 1e6 spread of gradient norms as at none; in the raw space the
Hessian spans the squared spread and the small-norm tasks drown.

When no direction improves every task (0 in the gradients' convex hull) f has no
minimiser; a ridge ``ridge * I`` added to C (i.e. ``ridge * n_k^2`` on each task's own
diagonal) keeps the solution finite there. A ridge on M scaled by its mean diagonal would
impose the largest task's scale on all: at a 1e3 spread it outweighs a small task's own
diagonal and leaves its equation 35% off. This one moves the equation to
beta_k (C beta)_k = 1 - ridge beta_k^2 exactly, so the residual of the original equation
is ridge * beta_k^2 plus the solver's ``tol``, at any spread: 1e-6 at the default for
orthogonal gradients (beta = 1), about 2e-5 for strongly conflicting ones (beta ~ 4);
``ridge = 0`` solves the original equation wherever it has a solution.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, GramWeighting


class NashMTLParams(GradTargetParams):
    ridge: float = Field(1e-6, ge=0)  # ridge on the correlation matrix, see the module docstring
    max_iter: int = Field(100, ge=1)  # Newton iterations at most
    tol: float = Field(1e-10, gt=0)  # stop when max_k |beta_k ((C + ridge I) beta)_k - 1| is below this


def nash_weights(m: np.ndarray, ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    k = m.shape[0]
    n = np.sqrt(np.maximum(np.diag(m), 0.0))
    live = n > 0
    alpha = np.ones(k)
    if not live.any():  # every gradient is zero: any weights give the same (zero) update
        return alpha
    # a zero gradient takes no part in the bargaining (its equation cannot hold): solve the
    # others, and leave it a weight of 1 that multiplies a zero vector anyway
    nl = n[live]
    cc = m[np.ix_(live, live)] / np.outer(nl, nl) + ridge * np.eye(int(live.sum()))
    # start on the best point of the ray beta = tau 1 (exact when the gradients are orthogonal)
    beta = np.full(len(nl), np.sqrt(len(nl) / max(float(cc.sum()), 1e-300)))

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ cc @ x) - float(np.sum(np.log(x)))

    last = np.inf
    for _ in range(max_iter):
        cb = cc @ beta
        res = float(np.abs(beta * cb - 1.0).max())
        # the equation itself (scale-free), or rounding: full Newton steps that no longer
        # halve the residual are past quadratic convergence, in a badly conditioned C
        if res <= tol or res > 0.5 * last:
            break
        grad = cb - 1.0 / beta
        try:
            step = np.linalg.solve(cc + np.diag(1.0 / beta**2), grad)
        except np.linalg.LinAlgError:  # ridge 0 and no solution: beta ran off to infinity
            break
        decrement = float(grad @ step)  # squared Newton decrement
        if not decrement > 0:  # rounding only: no descent left to find
            break
        t = 1.0
        last = res if decrement <= 0.1 else np.inf
        if decrement > 0.1:
            # damped phase: stay strictly positive, then backtrack until f decreases (Armijo).
            # f is self-concordant, so once the decrement is below 0.1 the full step stays
            # feasible and converges quadratically; a line search there would only stall
            # on f's rounding, which is far above the decrease left to make.
            while np.any(beta - t * step <= 0):
                t *= 0.5
            fx = f(beta)
            while f(beta - t * step) > fx - 0.25 * t * decrement and t > 1e-12:
                t *= 0.5
        beta = np.maximum(beta - t * step, 1e-300)
    alpha[live] = beta / nl
    return alpha


class NashMTL(GramWeighting):
    method = "nash_mtl"
    initial_coefficient = 1.0

    def __init__(self, params: NashMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
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
