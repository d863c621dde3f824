"""The device solvers of the problems on the simplex that MGDA (and MGDA-UB) and CAGrad solve
on the K x K Gram matrix (not a plugin: it registers nothing): ``solver = "device"``.

Both run on the Gram matrix's own device and read nothing back: no Python branch on a
value, no ``item``, only ``torch.linalg.solve_ex`` (no error check, so no wait). Instead
of iterating, they enumerate the 2^K - 1 supports S of the weights at once. Each optimum
has a support whose points are affinely independent (Caratheodory), and on it the
optimality conditions are linear (MGDA) or linear in one scalar s (CAGrad), so one batched
solve of 2^K - 1 bordered (K+1) x (K+1) systems yields a candidate per support that is,
for the optimal support, the optimum itself, exact to rounding: it is the same bordered
system that the exact active-set solver (``_active_set._affine_min``) solves last. Every
candidate is made feasible (negative weights clipped, mass renormalised), its objective is
evaluated as it is, and the smallest wins; a candidate from a singular or wrong support is
at worst a feasible point with a larger objective. No iteration count, no tolerance to tune.

Tensor operations (non-view aten ops, counted with a dispatch mode): 74 for MGDA and 132 for
CAGrad, whatever K (one batched solve), against some 35 per iteration of an accelerated
projected gradient, which needs 200-300 iterations to get within 1e-12 of the exact
objective on conflicting gradients (and ~1000 on a flat hull), or Frank-Wolfe, which is
still 1e-2 off after 300. Work and memory grow as 2^K (K + 1)^2: 1 MB of float64 systems at
K = 10, 5.5 MB at K = 12 (``MAX_TASKS``).

Conditioning: as in the exact solver, everything is written in the norm-free (correlation)
form. With n_k = |p_k|, C = M / (n n^T) has a unit diagonal, and the weights a become
y_k = a_k n_k / n_min, so that the objective a^T M a = n_min^2 y^T C y and the simplex
becomes {y >= 0, sum_k v_k y_k = 1}, v = n_min / n in (0, 1]: every number stays of order
one when the norms spread by 1e6, and the bordered system [[C_SS, v_S], [v_S^T, 0]]
(border rescaled to max 1) is regular whenever the points of S are affinely independent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

from ._common import gram_norms

# the most tasks the enumeration takes: 4095 supports of 13 x 13 systems
MAX_TASKS = 12
# a candidate with a weight below -FEASIBLE_TOL times its total is not clipped but dropped
FEASIBLE_TOL = 1e-9
EPS = torch.finfo(torch.float64).eps
# the ``solver`` field's description for the methods solved here (SolverParams' speaks of iterations)
SOLVER_DESCRIPTION = (
    "exact: the host-side solver on the K x K Gram matrix (one read from the device per step); "
    "device: the same optimum on the device, every support of the weights solved at once (no read: the step "
    f"never waits for the device; exact to rounding, see docs/weightings.md; at most {MAX_TASKS} tasks).")


def require_enumerable(method: str, solver: str, k: int) -> None:
    """Refuse ``solver = "device"`` for more than MAX_TASKS tasks (one-line ConfigError)."""
    if solver == "device" and k > MAX_TASKS:
        raise ConfigError(f"weighting '{method}': solver 'device' enumerates the 2^K supports and takes at most "
                          f"{MAX_TASKS} tasks, got {k}: use solver 'exact'")


def _supports(k: int, device) -> Tensor:
    """The 2^k - 1 non-empty subsets of range(k) as rows of a bool mask, made on ``device``."""
    codes = torch.arange(1, 2 ** k, device=device)
    return (codes[:, None] >> torch.arange(k, device=device)) & 1 == 1


class _Normed:
    """The correlation form of the Gram matrix ``m`` (see the module docstring).

    ``c`` the correlations (zero rows for zero points), ``v`` the simplex's weights in
    y-coordinates, ``zero`` the points of norm 0 (the min-norm point is then one of them)."""

    def __init__(self, m: Tensor) -> None:
        n = gram_norms(m)
        self.zero = ~(n > 0)
        ns = torch.where(self.zero, 1.0, n)
        nmin = torch.where(self.zero, torch.inf, n).amin()
        self.nmin = torch.where(torch.isfinite(nmin), nmin, 1.0)
        self.c = m / (ns[:, None] * ns[None, :])
        self.v = self.nmin / ns  # y_k = a_k / v_k


def _affine_minimisers(nm: _Normed, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per support S (rows of ``_supports``): p, the least-norm point of S's affine hull in
    y-coordinates (v^T p = 1, zero off S), and with ``extra`` (a K vector f) q, the solution of
    [[C_SS, v_S], [v_S^T, 0]] [q; mu] = [-f_S; 0] (the move of the affine minimiser per unit of
    a linear term f . y); the third tensor flags the supports whose system was solved (info 0).

    Rows off S are identity rows with right-hand side 0, so that every system is (K+1) x (K+1)
    and one batched LU solves them all."""
    c, v = nm.c, nm.v
    k = c.shape[0]
    s = _supports(k, c.device)
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    border = torch.where(s, v, 0.0)
    top = border.amax(-1, keepdim=True)  # the border rescaled to max 1, as in _active_set
    border = border / top
    a = torch.zeros(s.shape[0], k + 1, k + 1, dtype=c.dtype, device=c.device)
    a[:, :k, :k] = torch.where(s[:, :, None] & s[:, None, :], c, eye)
    a[:, :k, k] = border
    a[:, k, :k] = border
    rhs = torch.zeros(s.shape[0], k + 1, 1 if extra is None else 2, dtype=c.dtype, device=c.device)
    rhs[:, k, 0] = 1.0
    if extra is not None:
        rhs[:, :k, 1] = torch.where(s, -extra, 0.0)
    sol, info = torch.linalg.solve_ex(a, rhs)
    p = sol[:, :k, 0] / top  # v^T p = 1 with the true border
    q = sol[:, :k, 1] if extra is not None else None
    return p, q, info == 0


def _feasible(nm: _Normed, y: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates y (rows) clipped to y >= 0 and rescaled to v^T y = 1, and which are usable:
    solved, finite, and with no weight below -FEASIBLE_TOL of the total (a wrong support's)."""
    total = y.abs().sum(-1, keepdim=True)
    ok = ok & torch.isfinite(y).all(-1) & (y >= -FEASIBLE_TOL * total).all(-1)
    y = y.clamp(min=0.0)
    mass = y @ nm.v
    ok = ok & (mass > 0)
    return y / torch.where(ok, mass, 1.0)[:, None], ok


def _pick(y: Tensor, objective: Tensor, ok: Tensor) -> Tensor:
    """The row of y with the smallest objective among the usable ones (no read: an index_select)."""
    best = torch.where(ok & ~torch.isnan(objective), objective, torch.inf).argmin()
    return y.index_select(0, best.reshape(1))[0]


def _weights(nm: _Normed, y: Tensor) -> Tensor:
    """The simplex weights a = v * y (sum 1)."""
    a = nm.v * y
    return a / a.sum()


def _quad(y: Tensor, c: Tensor, z: Tensor | None = None) -> Tensor:
    """Row-wise y^T C z (z = y when None)."""
    return ((y @ c) * (y if z is None else z)).sum(-1)


def min_norm_weights_device(m: Tensor) -> Tensor:
    """Weights a on the simplex minimising a^T M a (the min-norm point of the convex hull of
    the points with Gram matrix ``m``, K <= MAX_TASKS), on ``m``'s device: what
    ``_active_set.min_norm_weights`` finds, to rounding (module docstring). A zero point
    gives its vertex (the first one), all points zero the uniform weights, as there."""
    k = m.shape[0]
    nm = _Normed(m)
    p, _, ok = _affine_minimisers(nm)
    y, ok = _feasible(nm, p, ok)
    a = _weights(nm, _pick(y, _quad(y, nm.c), ok))
    first_zero = nm.zero & (torch.cumsum(nm.zero.to(torch.long), 0) == 1)
    a = torch.where(nm.zero.any(), first_zero.to(a.dtype), a)
    return torch.where(nm.zero.all(), torch.full_like(a, 1.0 / k), a)


def cagrad_dual_device(m: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """CAGrad's dual on the device (K <= MAX_TASKS, c > 0): the weights w on the simplex
    minimising F(w) = w^T M b + c |g0| |g_w| (b = 1/K, |g0|^2 = b^T M b, |g_w|^2 = w^T M w),
    and c |g0| / |g_w| (0 where g0 or g_w is 0 to rounding: the caller keeps g0), so that the
    update is g0 + (that) g_w: what ``cagrad.solve_dual`` finds, to rounding.

    On a support S the optimum w is the affine minimiser of the shifted points g_k + s g0 at
    the s where |g_w| = r s, r = c |g0| (cagrad.py's derivation): w(s) = p_S + s q_S is linear
    in s (q: ``_affine_minimisers`` with f = C beta, beta the y-coordinates of b), so that
    |g_w(s)|^2 = r^2 s^2 is a quadratic in s. Its positive roots and s = 0 (g_w = 0: a hull
    holding 0) give three candidates per support; F decides."""
    k = m.shape[0]
    nm = _Normed(m)
    beta = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device) / nm.v  # b in y-coordinates
    cb = nm.c @ beta
    g0_sq = beta @ cb  # |g0|^2 / n_min^2
    r = c * g0_sq.clamp(min=0).sqrt()
    p, q, ok = _affine_minimisers(nm, cb)
    alpha, cross, gamma = _quad(p, nm.c), _quad(p, nm.c, q), _quad(q, nm.c)
    # (gamma - r^2) s^2 + 2 cross s + alpha = 0, both roots without cancellation
    lead = gamma - r * r
    disc = cross * cross - lead * alpha
    big = -(cross + torch.where(cross < 0, -1.0, 1.0) * disc.clamp(min=0).sqrt())
    roots = torch.stack([big / lead, alpha / big], 0)  # +-inf or nan where degenerate: dropped below
    roots_ok = (disc >= 0) & torch.isfinite(roots) & (roots > 0)
    y = torch.cat([p, (p + roots[0, :, None] * q), (p + roots[1, :, None] * q)], 0)
    ok = torch.cat([ok, ok & roots_ok[0], ok & roots_ok[1]], 0)
    y, ok = _feasible(nm, torch.where(ok[:, None], y, 0.0), ok)
    norm_sq = _quad(y, nm.c)
    objective = y @ cb + r * norm_sq.clamp(min=0).sqrt()
    y = _pick(y, objective, ok)
    w = _weights(nm, y)
    # |g_w| resolved above the rounding of w^T M w (cagrad.resolved_norm): sum_k w_k n_k / n_min = sum y
    gw_sq = nm.c @ y @ y
    resolved = (gw_sq > 64 * k * EPS * y.sum() ** 2) & (g0_sq > 0)
    scale = torch.where(resolved, r / torch.where(resolved, gw_sq, 1.0).sqrt(), 0.0)
    return w, scale
