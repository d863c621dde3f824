"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

The update d = sum_k w_k g_k is the alpha-fair allocation among tasks: with M = G G^T,
w > 0 solves (M w)_k = w_k^(-1/alpha), i.e. each task's rate of improvement g_k . d is
w_k^(-1/alpha). alpha = 1 (the default in the authors' code) is proportional fairness,
Nash-MTL's equation; as alpha grows the rates approach each other (g_k . d = 1 for every
k in the limit: max-min fairness). For orthogonal gradients w_k = |g_k|^(-2 alpha / (1 + alpha)).

The equation is the stationarity condition of a strictly convex function, minimised by the
same damped Newton method as Nash-MTL (``nash_mtl.nash_weights`` with power = 1 / alpha),
instead of the authors' nonlinear least squares from w = 1/K. Unlike alpha = 1, other
alphas are not invariant to the scale of the gradients (the authors' choice; the task
weights then depend on the gradient norms' units). ``ridge`` keeps the solution finite
when 0 lies in the gradients' convex hull (see nash_mtl).

``solver = "device"`` runs the same damped Newton method on the device for exactly
``device_iters`` iterations, with a vectorised line search and no read of any value
(``_newton_device``): the step never waits for the device. The larger alpha and the wider
the spread of gradient norms, the more iterations the method needs (the exact solver too:
its damped phase is longer); the default covers alpha up to 5 at norm spreads up to 1e6.
"""

from __future__ import annotations

from pydantic import Field

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting, SolverParams
from ._newton_device import device_nash_weights
from .nash_mtl import nash_weights


class FairGradParams(SolverParams):
    alpha: float = Field(1.0, gt=0)  # the fairness exponent (1: proportional fairness)
    ridge: float = Field(1e-6, ge=0)  # ridge on the gradients' correlation matrix (see nash_mtl)
    max_iter: int = Field(200, ge=1)  # Newton iterations at most
    tol: float = Field(1e-10, gt=0)  # stop when max_k |(M w)_k w_k^(1/alpha) - 1| is below this
    # 60: enough for alpha <= 5 at gradient-norm spreads up to 1e6 (measured against the exact solver)
    device_iters: int = Field(60, ge=1, le=1000, description="solver = device: damped Newton iterations, a "
                              "fixed count (an iterate within tol stays where it is)")


class FairGrad(GramWeighting):
    method = "fairgrad"
    initial_coefficient = 1.0

    def __init__(self, params: FairGradParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.alpha = float(params.alpha)
        self.ridge = float(params.ridge)
        self.max_iter = params.max_iter
        self.tol = params.tol
        self.device_iters = params.device_iters
        self.use_solver(params.solver)

    def device_coefficients(self, m, losses):
        return device_nash_weights(m, self.ridge, self.device_iters, self.tol, power=1.0 / self.alpha)

    def coefficients(self, m, extra=None):
        return nash_weights(m, self.ridge, self.max_iter, self.tol, power=1.0 / self.alpha)


@hookimpl
def register_weightings(register):
    register(
        "fairgrad",
        FairGrad,
        params=FairGradParams,
        description="FairGrad (Ban & Ji 2024): alpha-fair task weights, (G G^T w)_k = w_k^(-1/alpha)",
    )
