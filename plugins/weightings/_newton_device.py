"""Damped Newton on the device for the Nash-MTL / FairGrad equation (solver = "device").

The same problem as ``nash_mtl.nash_weights`` (read its docstring): alpha > 0 with
(M alpha)_k = alpha_k^-power, solved in the normalised space beta = n alpha by minimising
the strictly convex

    f(beta) = 1/2 beta^T (C + ridge I) beta - sum_k c_k phi(beta_k),   C = M / (n n^T),

(c_k = n_k^(power - 1); phi = log at power 1, beta^(1 - power) / (1 - power) otherwise),
but with no read of any tensor value, so that a training step never waits for the device:

- a fixed number of iterations (``iters``); an iterate whose residual
  max_k |(C beta)_k / (c_k beta_k^-power) - 1| is below ``tol``, or whose Newton step is
  not a finite descent direction, is frozen (its step is masked to 0), never a ``break``;
- the Newton system is solved with ``torch.linalg.solve_ex`` (its error flag is not read:
  a singular system gives a non-finite step, masked as above);
- the line search is vectorised: the 41 step sizes 1, 1/2, ..., 2^-39 and 0 are evaluated
  at once and the largest one that keeps beta > 0 and satisfies Armijo's condition (with
  factor 1/4, as the exact solver) is taken; once the step is small (squared Newton
  decrement at most 0.1 at power 1, where f is self-concordant, or down to f's rounding at
  other powers) the full step is taken whenever it keeps beta > 0, as the exact solver
  does; if no size satisfies Armijo (rounding), the largest that keeps beta > 0 is taken
  (the size 0 always does: a masked step leaves beta where it is);
- the first iterate is the best of 9 rays evaluated at once (see ``start``): at power 1 the
  exact solver's start, at other powers one that follows the spread of the gradient norms;
- a zero gradient (n_k = 0) is decoupled by masking: its row and column of C are the
  identity's, so its beta stays at its start, 1, and its weight is 1 (as the exact solver's).

Cost: about 43 tensor ops per iteration at power 1 and 49 at other powers (views not
counted), each on a K-vector, a K x K matrix or the 41 x K (41 x K x K for f) candidates,
one of them the K x K ``solve_ex`` (an LU factorisation and two triangular solves), plus
about 75 to set up: Nash-MTL's default 20 iterations are some 900 kernel launches per
solve, FairGrad's 60 some 3000. K enters only as tensor shapes, never as a loop count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import gram_norms

STEP_SIZES = 40  # halvings of the Newton step tried at once (1 .. 2^-39), besides 0
ARMIJO = 0.25
START_RAYS = 9  # rays tried at once for the first iterate (see start)


def device_nash_weights(m: Tensor, ridge: float = 1e-6, iters: int = 20, tol: float = 1e-10,
                        power: float = 1.0) -> Tensor:
    """alpha > 0 (float64, on ``m``'s device) with (M alpha)_k = alpha_k^-power, for the
    K x K Gram matrix ``m``; reads nothing (see the module docstring)."""
    m = m.to(torch.float64)
    k = m.shape[0]
    dev = m.device
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    n = gram_norms(m)
    live = n > 0
    ns = torch.where(live, n, torch.ones_like(n))
    pair = live[:, None] & live[None, :]
    cc = torch.where(pair, m / (ns[:, None] * ns[None, :]) + ridge * eye, eye)
    one = power == 1.0
    wt = torch.ones_like(n) if one else ns ** (power - 1.0)
    # 1, 1/2, ..., 2^-39 (exact halvings), then 0: made on the device (no copy from the host)
    halves = torch.full((STEP_SIZES + 1,), 0.5, dtype=torch.float64, device=dev).cumprod(0) * 2.0
    sizes = torch.where(torch.arange(STEP_SIZES + 1, device=dev) < STEP_SIZES, halves, 0.0)
    armijo = ARMIJO * sizes
    full = sizes == 1.0
    half = 0.5 * cc

    def objective(b: Tensor) -> Tensor:  # f at each row of b (rows > 0)
        # b_i half_ij b_j summed elementwise: a matrix product of these small sizes goes to a
        # threaded BLAS on the CPU, a thousand times slower there when the cores are shared
        quad = (b[:, :, None] * half * b[:, None, :]).sum((-2, -1))
        if one:
            return quad - b.log().sum(-1)
        return quad - (wt * b ** (1.0 - power)).sum(-1) / (1.0 - power)

    beta = start(cc, wt, live, power, objective)
    for _ in range(iters):  # 43 tensor ops an iteration at power 1, 49 at others (see above)
        cb = cc @ beta
        pull = 1.0 / beta if one else wt * beta ** -power
        grad = cb - pull
        res = (cb / pull - 1.0).abs().amax()  # the scale-free residual of the equation
        curv = pull / beta if one else power * pull / beta
        step, _ = torch.linalg.solve_ex(cc + torch.diag_embed(curv), grad)  # flag not read: see go
        dec = grad @ step  # squared Newton decrement
        go = torch.isfinite(step).all() & (dec > 0) & (res > tol)
        step = torch.where(go, step, 0.0)
        dec = torch.where(go, dec, 0.0)
        cand = beta - sizes[:, None] * step
        positive = cand > 0
        feasible = positive.all(-1)
        fc = objective(torch.where(positive, cand, 1.0))
        f0 = fc[-1]  # size 0: beta itself
        near = dec <= 0.1 if one else dec <= 1e-12 * (1.0 + f0.abs())
        ok = feasible & ((fc <= f0 - armijo * dec) | (near & full))
        best = torch.argmax(ok.to(torch.int8) + feasible)  # the first ok size, else the first feasible one
        beta = cand.index_select(0, best.reshape(1))[0]  # (a tensor index: no read)
    return beta / ns


def start(cc: Tensor, wt: Tensor, live: Tensor, power: float, objective) -> Tensor:
    """The first iterate: the best point (least f) of the rays beta = tau v, v_k = c_k^e for
    the exponents e = 1 / (power + r), r = 0, 1/8, ..., 1, each at its best tau, over the live
    tasks (dead ones at 1). r = 1 is the solution for orthogonal gradients, r = 0 for
    collinear ones; at power 1 every v is 1, the exact solver's start."""
    rho = torch.arange(START_RAYS, dtype=torch.float64, device=cc.device) / (START_RAYS - 1)
    logv = (1.0 / (power + rho))[:, None] * wt.log()[None, :]
    logv = torch.where(live, logv, torch.full_like(logv, -torch.inf))
    v = (logv - logv.amax(-1, keepdim=True)).exp()  # each ray's largest entry 1 (no overflow)
    v = torch.where(live, v, torch.zeros_like(v))
    if power == 1.0:
        pulled = live.sum().to(torch.float64)
    else:  # (0 ** (1 - power) is inf above power 1: the dead tasks' zeros left out)
        pulled = torch.where(live, wt * v ** (1.0 - power), torch.zeros_like(v)).sum(-1)
    tau = (pulled / (v[:, :, None] * cc * v[:, None, :]).sum((-2, -1)).clamp(min=1e-300)) ** (1.0 / (1.0 + power))
    rays = torch.where(live, tau[:, None] * v, torch.ones_like(v))
    f = objective(rays)
    f = torch.where(torch.isfinite(f) & (rays > 0).all(-1), f, torch.full_like(f, torch.inf))
    return rays.index_select(0, torch.argmin(f).reshape(1))[0]
