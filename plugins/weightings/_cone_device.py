"""The projection onto the dual cone of the task gradients on the device (not a plugin: it
registers nothing): UPGrad's and DualProj's ``solver = "device"``.

The problem of ``_active_set.cone_projection``, v = argmin_{v >= u} v^T M v, in the same
scale-free form: y = n v and C = M / (n n^T) (unit diagonal, entries in [-1, 1] whatever
the gradient norms n), min_{y >= l} 1/2 y^T C y with l = n u. A batch of B right-hand sides
is solved at once (UPGrad projects each of its K weighted gradients: B = K; DualProj: B = 1),
and nothing is read back: fixed operation counts, masks instead of branches.

1. ``iterations`` steps of accelerated projected gradient (FISTA: Beck & Teboulle, SIAM J.
   Imaging Sci. 2, 2009) on the box y >= l, step 1/L with L = min(trace C, Gershgorin
   bound) >= C's largest eigenvalue (both <= K: no eigendecomposition). Each step is five
   tensor operations: a B x K by K x K product, a fused multiply-add, a maximum, a lerp.
2. ``rounds`` steps of Lawson & Hanson's active-set method (Solving Least Squares Problems,
   1974, ch. 23), the exact solver's algorithm, vectorised over the batch and over two
   starts at once: the FISTA iterate (near the optimum: a round or two usually finish it)
   and the exact solver's own start z = 0 (at most 9 rounds on the problems measured, K <= 10,
   near-collinear, identical and rank-deficient gradients included). A round solves the
   free block exactly (batched Cholesky with a 1e-12 ridge, one step of iterative
   refinement; about fifty tensor operations in all); once the free set is the optimal one,
   the result is the exact solution up to rounding.

Per problem, the candidate of least KKT residual wins (the FISTA iterate included), so too
few rounds degrade to the FISTA accuracy rather than to something arbitrary. With the
defaults (50 iterations, 10 rounds) a step issues about 770 tensor operations whatever K,
on tensors of at most 2K x K x K elements. A zero gradient (n_k = 0) takes no part, as in
the exact solver: its row of C is zero and it keeps v_k = u_k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import gram_norms

# ridge of the free block's Cholesky, relative to C's unit diagonal: makes a singular block
# (identical or dependent gradients: its right-hand side lies in its range) and rounding's
# tiny negative eigenvalues factorable; one step of iterative refinement removes its bias
RIDGE = 1e-12


def momentum(iters: int) -> list[float]:
    """FISTA's extrapolation weights (t_k - 1) / t_{k+1}, on the host (Python floats)."""
    out, t = [], 1.0
    for _ in range(iters):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        out.append((t - 1.0) / t_next)
        t = t_next
    return out


def residual(c: Tensor, y: Tensor, l: Tensor) -> Tensor:
    """Per row, the KKT residual of min_{y >= l} 1/2 y^T C y: max_k |y - max(y - C y, l)|_k,
    zero exactly at the optimum; a negative (C y)_k, a gradient the projection conflicts
    with, counts in full. NaN where y is not finite."""
    return (y - torch.maximum(y - y @ c, l)).abs().amax(dim=-1)


def fista(c: Tensor, l: Tensor, iters: int) -> Tensor:
    """``iters`` accelerated projected-gradient steps from y = l (feasible throughout)."""
    step = 1.0 / torch.minimum(torch.diagonal(c).sum(), c.abs().sum(dim=-1).amax()).clamp_min(1.0)
    y = w = l
    for beta in momentum(iters):
        y_new = torch.maximum(torch.addcmul(w, w @ c, -step), l)
        w = torch.lerp(y_new, y, -beta)  # y_new + beta (y_new - y)
        y = y_new
    return y


def cholesky_solve(chol: Tensor, b: Tensor) -> Tensor:
    """L^-T L^-1 b by two triangular solves: operations with no error flag to check, so
    none waits for the device (as ``torch.linalg.cholesky_ex`` with its default)."""
    return torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, b, upper=False), upper=True)


def lawson_hanson(c: Tensor, l: Tensor, y: Tensor, rounds: int) -> Tensor:
    """``rounds`` steps of Lawson & Hanson's method from the feasible ``y``, every row at
    once. A step solves the free set's block (C_FF y_F = -C_FB l_B) and walks from y towards
    that solution until a free coordinate reaches its bound, which leaves the set; if none
    does, y is the block's minimiser and the bound coordinate whose gradient descends most
    (beyond the exact solver's rounding tolerance) enters. The objective never rises."""
    k = c.shape[-1]
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    ridged, eye_ridged = c + RIDGE * eye, (1.0 + RIDGE) * eye
    minus_q = -(l @ c)  # minus the gradient C y at y = l (z = 0), as in the exact solver
    tol = 64 * k * torch.finfo(c.dtype).eps * l.abs().sum(dim=-1, keepdim=True).clamp_min(1.0)
    inf = torch.full_like(l, math.inf)
    f = y > l
    for _ in range(rounds):
        both = f[:, :, None] & f[:, None, :]
        a = torch.where(both, c, eye)  # the free block, the identity on the bound coordinates
        b = torch.where(f, minus_q, 0.0)[:, :, None]  # A z = b, z = y - l
        chol, info = torch.linalg.cholesky_ex(torch.where(both, ridged, eye_ridged))
        z = cholesky_solve(chol, b)
        z = (z + cholesky_solve(chol, b - a @ z))[:, :, 0]  # one step of iterative refinement
        p = torch.where(f, l + z, l)
        p = torch.where(((info == 0) & p.isfinite().all(dim=-1))[:, None], p, y)  # a failed solve: stay
        down = f & (p < l)
        ratio = torch.where(down, (y - l) / (y - p), inf)  # the step at which each reaches its bound
        theta = ratio.amin(dim=-1, keepdim=True).clamp(max=1.0)
        f = f & (ratio > theta)
        y = torch.where(f, torch.maximum(y + theta * (p - y), l), l)
        grad = torch.where(f, inf, y @ c)
        low = grad.amin(dim=-1, keepdim=True)
        f = f | ((grad == low) & (low < -tol) & (theta >= 1.0))
    return y


def solve(c: Tensor, l: Tensor, iters: int, rounds: int) -> Tensor:
    """argmin_{y >= l} 1/2 y^T C y for each row of ``l`` (B x K); C (K x K) symmetric
    positive semidefinite with a diagonal of ones (zeros for a zero gradient)."""
    b = l.shape[0]
    warm = fista(c, l, iters)
    ends = lawson_hanson(c, torch.cat([l, l]), torch.cat([warm, l]), rounds)
    cands = torch.stack([ends[:b], ends[b:], warm])  # 3 x B x K
    res = torch.nan_to_num(residual(c, cands, l), nan=math.inf)
    pick = res.argmin(dim=0)  # per row, the candidate of least KKT residual
    return torch.gather(cands, 0, pick[None, :, None].expand(1, b, l.shape[1]))[0]


def cone_projection_device(m: Tensor, u: Tensor, iters: int, rounds: int) -> Tensor:
    """Coefficients v (B x K) of the projections of x_b = sum_k u_bk g_k (u: B x K) onto the
    dual cone of the gradients whose Gram matrix is ``m`` (K x K, float64): for each row as
    ``_active_set.cone_projection``, on m's device, reading nothing."""
    n = gram_norms(m)
    live = n > 0
    ns = torch.where(live, n, torch.ones_like(n))
    both = live[:, None] & live[None, :]
    c = torch.where(both, m / (ns[:, None] * ns[None, :]), 0.0)
    y = solve(c, u * n, iters, rounds)
    return torch.where(live, y / ns, u)
