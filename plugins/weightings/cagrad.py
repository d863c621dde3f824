"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

The update d maximises the worst task improvement min_i g_i . d within the ball
|d - g0| <= r = c |g0| around the mean gradient g0. Its dual is a problem over the simplex,

    min_w  F(w) = g_w . g0 + r |g_w|,   g_w = sum_i w_i g_i,

and d = g0 + r g_w / |g_w|, divided by 1 + c^2 by default (``rescale``, as in the authors'
experiments). c = 0 gives the mean gradient.

F is badly conditioned when gradient norms differ by orders of magnitude (its Hessian
spans their squared ratio), so first-order descent on w stalls there. Instead the norm is
written as r |g_w| = min_{s > 0} |g_w|^2 / (2 s) + r^2 s / 2, which turns the dual into

    min_{s > 0}  min_w |g_w + s g0|^2 / (2 s) + (r^2 - |g0|^2) s / 2:

for a fixed s the inner problem is the min-norm point of the hull of the shifted points
g_i + s g0, solved exactly by the active-set method MGDA uses (``min_norm_weights``), i.e.
g_w(s) is the projection of -s g0 onto the hull of the gradients. The outer function is
convex in s with derivative (r^2 - |g_w(s)|^2 / s^2) / 2, so its minimiser is the single
root of h(s) = log |g_w(s)| - log s - log r, which decreases in s. A root search on log s
that keeps the root bracketed (regula falsi with the Illinois modification, so that both
ends move) converges to it whatever the norm spread, since every step only needs the sign
of h, computed from an exact inner solution. The old projected-gradient descent on w
stalled from a 1e3 spread on (objective 5e-2 off, and 1e2 times off at 1e6).

``solver = "device"`` solves the same dual on the gradients' device without reading
anything back (``_simplex_device.cagrad_dual_device``): on each support the optimum is the
shifted problem's affine minimiser, linear in s, so |g_w(s)| = r s is a quadratic in s,
and all supports are solved at once (exact to rounding, up to ``MAX_TASKS`` = 12 tasks).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mtlkit.hookspecs import hookimpl

from ._active_set import min_norm_weights
from ._common import GramWeighting, SolverParams, gram_norms
from ._simplex_device import SOLVER_DESCRIPTION, cagrad_dual_device, require_enumerable


class CAGradParams(SolverParams):
    solver: Literal["exact", "device"] = Field("exact", description=SOLVER_DESCRIPTION)
    c: float = Field(0.4, ge=0)  # radius of the ball around g0, relative to |g0|
    rescale: Literal["none", "1+c^2", "1+c"] = "1+c^2"  # divisor of the final update
    # the exact solver's root search; the device solver has no iteration count or tolerance
    max_iter: int = Field(100, ge=1)  # root-search steps on s at most (each solves one min-norm problem)
    tol: float = Field(1e-12, gt=0)  # stop when the bracket of s is this narrow (relative)


def resolved_norm(m: np.ndarray, w: np.ndarray) -> float:
    """|g_w| from the Gram matrix, or 0 where it is below the rounding of w^T M w.

    w^T M w carries an absolute error of about K eps (sum_i w_i |g_i|)^2, so a g_w that
    cancels below sqrt of that is indistinguishable from 0 and has no usable direction.
    """
    sq = float(w @ m @ w)
    span = float(w @ gram_norms(m))
    return math.sqrt(sq) if sq > 64 * m.shape[0] * np.finfo(np.float64).eps * span * span else 0.0


def solve_dual(m: np.ndarray, c: float, max_iter: int = 100, tol: float = 1e-12) -> np.ndarray:
    """argmin over the simplex of w^T M b + c sqrt(b^T M b) sqrt(w^T M w), b = 1/K."""
    k = m.shape[0]
    b = np.full(k, 1.0 / k)
    mb = m @ b
    g0_sq = float(b @ mb)
    if c == 0 or not g0_sq > 0:
        return b
    r = c * math.sqrt(g0_sq)

    def inner(t: float) -> tuple[np.ndarray, float]:
        """At s = e^t: weights of the projection of -s g0 onto the hull, and h = log(|g_w| / (r s))."""
        s = math.exp(t)
        shifted = m + s * (mb[:, None] + mb[None, :]) + (s * s * g0_sq)  # Gram of g_i + s g0
        w = min_norm_weights(shifted)
        gw = resolved_norm(m, w)
        return w, (math.log(gw) if gw > 0 else -math.inf) - math.log(r * s)

    # The root lies below s = max_i |g_i| / r (as |g_w| <= max_i |g_i|) and above
    # s = delta / r, delta = the hull's min norm (as |g_w| >= delta). A hull holding 0 gives
    # no lower bound: walk down until h > 0, or until g_w is 0 to rounding, which means the
    # optimum is g_w = 0 (no direction improves every task; the caller keeps g0).
    w0 = min_norm_weights(m)
    delta = resolved_norm(m, w0)
    floor = math.log(delta / r) if delta > 0 else -math.inf
    hi = math.log(math.sqrt(float(np.max(np.diag(m)))) / r)
    w_hi, h_hi = inner(hi)
    if h_hi >= 0:  # root at the upper bound: the projection is a single longest vertex
        return w_hi
    lo = top = hi
    while True:  # down by factors of 100 in s; e^-200 below the top is far past float64's range
        lo = max(lo - math.log(100.0), floor)
        w_lo, h_lo = inner(lo)
        if h_lo > 0:
            break
        if h_lo == -math.inf or lo <= floor or lo < top - 200:  # root at the floor, or g_w = 0
            return w_lo
        hi, w_hi, h_hi = lo, w_lo, h_lo
    side = 0
    for _ in range(max_iter):
        if hi - lo <= tol:
            break
        # regula falsi on the decreasing h, with the Illinois halving so that a stuck end
        # still moves; bisection when h_hi is -inf (g_w = 0 there) or rounding puts the
        # secant point outside the bracket
        t = (lo * h_hi - hi * h_lo) / (h_hi - h_lo) if math.isfinite(h_hi) else 0.5 * (lo + hi)
        if not lo < t < hi:
            t = 0.5 * (lo + hi)
        w_t, h_t = inner(t)
        if h_t == 0:
            return w_t
        if h_t > 0:
            lo, h_lo, w_lo = t, h_t, w_t
            if side == 1:
                h_hi *= 0.5
            side = 1
        else:
            hi, h_hi, w_hi = t, h_t, w_t
            if side == -1:
                h_lo *= 0.5
            side = -1
    return w_lo if abs(h_lo) <= abs(h_hi) else w_hi


class CAGrad(GramWeighting):
    method = "cagrad"

    def __init__(self, params: CAGradParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.use_solver(params.solver)
        require_enumerable(self.method, params.solver, len(self.task_names))
        self.c = float(params.c)
        self.rescale = params.rescale
        self.max_iter = params.max_iter
        self.tol = params.tol

    def coefficients(self, mm: np.ndarray, extra=None) -> np.ndarray:
        """Coefficients of the update d = coef @ grads, from the Gram matrix."""
        k = mm.shape[0]
        b = np.full(k, 1.0 / k)
        coef = b.copy()
        if self.c > 0:
            w = solve_dual(mm, self.c, self.max_iter, self.tol)
            g0_norm = np.sqrt(max(float(b @ mm @ b), 0.0))
            gw_norm = resolved_norm(mm, w)
            if gw_norm > 0:  # g_w = 0: the direction is undefined, keep g0
                coef = coef + self.c * g0_norm / gw_norm * w
        return coef / self.divisor()

    def device_coefficients(self, m: torch.Tensor, losses=None) -> torch.Tensor:
        """The same coefficients on the device (no read)."""
        k = m.shape[0]
        coef = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
        if self.c > 0:
            w, scale = cagrad_dual_device(m, self.c)  # scale 0 where g_w = 0: keep g0
            coef = coef + scale * w
        return coef / self.divisor()

    def divisor(self) -> float:
        """What the update is divided by (``rescale``)."""
        return {"1+c^2": 1.0 + self.c**2, "1+c": 1.0 + self.c}.get(self.rescale, 1.0)


@hookimpl
def register_weightings(register):
    register(
        "cagrad",
        CAGrad,
        params=CAGradParams,
        description="CAGrad (Liu et al. 2021): best worst-case improvement near the mean gradient",
    )
