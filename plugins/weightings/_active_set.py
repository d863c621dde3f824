"""The exact active-set solvers of the Gram-based weightings (not a plugin: it registers
nothing): the min-norm point of the task gradients' convex hull (MGDA, CAGrad's inner
problem) and the projection onto their dual cone (UPGrad, DualProj).

Both work on the K x K float64 Gram matrix as a numpy array, on the host: their loops
branch on values at every step, which on an accelerator would wait for the device each
time (``_common.host_gram`` reads the matrix once per training step).
"""

from __future__ import annotations

import numpy as np

from ._common import gram_norms


def _affine_min(m: np.ndarray, n: np.ndarray, idx: list[int]) -> np.ndarray:
    """Coefficients v (sum 1) of the least-norm point of the affine hull of the points idx.

    Stationarity reads M_SS v = mu 1. It is solved for y = n * v against the correlation
    block C = M_SS / (n n^T), whose entries lie in [-1, 1] whatever the norms: M_SS itself
    mixes entries 1e12 apart at a 1e6 norm spread. The bordered system [[C, c], [c^T, 0]]
    (c = 1 / n, rescaled to max 1) stays regular when C is singular, as long as the points
    are affinely independent, which the active-set method below maintains.
    """
    ns = n[idx]
    c = ns.min() / ns
    s = len(idx)
    kkt = np.zeros((s + 1, s + 1))
    kkt[:s, :s] = m[np.ix_(idx, idx)] / np.outer(ns, ns)
    kkt[:s, s] = kkt[s, :s] = c
    rhs = np.zeros(s + 1)
    rhs[s] = 1.0
    try:
        y = np.linalg.solve(kkt, rhs)[:s]
    except np.linalg.LinAlgError:  # numerically dependent points: a least-squares solution
        y = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:s]
    v = y / ns
    return v / v.sum()


def kkt_violation(m: np.ndarray, n: np.ndarray, a: np.ndarray, tol: float) -> np.ndarray:
    """Per vertex j, how far |x|^2 - p_j . x exceeds what optimality allows (> 0: violated).

    Allowed: tol |x| |p_j - x| (a cosine of tol between x and x - p_j: scale-free) plus the
    float64 rounding of the Gram products, about eps (sum_i a_i n_i) (n_j + sum_i a_i n_i).
    n holds the points' norms.
    """
    ma = m @ a
    xx = max(float(a @ ma), 0.0)
    dist = np.sqrt(np.maximum(n * n - 2.0 * ma + xx, 0.0))  # |p_j - x|
    span = float(a @ n)
    noise = 8 * m.shape[0] * np.finfo(np.float64).eps * span * (n + span)
    return (xx - ma) - tol * np.sqrt(xx) * dist - noise


def min_norm_weights(m: np.ndarray, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Weights a on the simplex minimising a^T M a: the min-norm point x = sum_k a_k p_k of
    the convex hull of points p_k with Gram matrix M (MGDA's subproblem, Sener & Koltun 2018).

    Wolfe's minimum-norm-point algorithm (Wolfe, Math. Programming 11, 1976), an active-set
    method: keep affinely independent vertices S and x = the least-norm point of their
    affine hull; while a vertex p_j has p_j . x < |x|^2 (moving to it shortens x), add it;
    whenever the affine minimiser leaves the simplex, walk towards it up to the simplex's
    boundary and drop the vertices that reach zero weight. |x| falls strictly and no set
    repeats, so it ends after finitely many steps at the exact optimum; unlike Frank-Wolfe
    it does not crawl when the hull is flat or the norms differ by 1e6.

    It stops at the KKT conditions (``kkt_violation`` <= 0 for every vertex); the vertices
    in S hold p_j . x = |x|^2 to rounding, as x is S's affine minimiser. ``max_iter``
    (major plus minor steps) only guards against a numerically degenerate loop.
    """
    mm = np.asarray(m, dtype=np.float64)
    k = mm.shape[0]
    n = gram_norms(mm)
    if not n.max() > 0:  # every point is 0: all weights give the same (zero) point
        return np.full(k, 1.0 / k)
    a = np.zeros(k)
    j = int(np.argmin(n))
    a[j] = 1.0
    if n[j] == 0:  # a zero point is the min-norm point
        return a
    act = [j]
    steps = 0
    done = False
    while not done and steps < max_iter:
        steps += 1
        viol = kkt_violation(mm, n, a, tol)
        if viol.max() <= 0:
            break
        # enter the vertex whose edge from x descends most steeply (a scale-free choice)
        ma = mm @ a
        xx = float(a @ ma)
        dist = np.sqrt(np.maximum(n * n - 2.0 * ma + xx, 1e-300))
        j = int(np.argmax(np.where(viol > 0, (xx - ma) / dist, -np.inf)))
        if j in act:  # x is not quite S's affine minimiser: rounding, nothing left to gain
            break
        act.append(j)
        while steps < max_iter:  # minor cycle: until S's affine minimiser is inside the simplex
            steps += 1
            v = _affine_min(mm, n, act)
            if np.all(v > 0):
                a[:] = 0.0
                a[act] = v
                break
            cur = a[act]
            out = np.flatnonzero(v <= 0)
            # the step from a towards v at which each of those weights reaches 0
            ratios = cur[out] / np.maximum(cur[out] - v[out], 1e-300)
            theta = float(ratios.min())
            new = np.maximum(cur + theta * (v - cur), 0.0)
            drop = {act[i] for i in out[ratios <= theta]} | {act[i] for i in np.flatnonzero(new <= 0)}
            a[act] = new
            a[list(drop)] = 0.0
            a /= a.sum()
            act = [i for i in act if i not in drop]
            if theta == 0.0 and j in drop:  # the entering vertex cannot take weight: optimal to rounding
                done = True
                break
    return a


def cone_projection(m: np.ndarray, u: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Coefficients v of the projection of x = sum_k u_k g_k onto the dual cone of the task
    gradients {d : g_k . d >= 0 for every k}, given their Gram matrix M: the projection is
    sum_k v_k g_k with v = argmin_{v >= u} v^T M v (Quinton & Rey 2024, Prop. 1; the dual of
    the projection problem of GEM, Lopez-Paz & Ranzato 2017).

    Solved in the normalised space (y = n v, C = M / (n n^T), unit diagonal whatever the
    norms) as the non-negative least-squares problem min_{z >= 0} |A (l + z)|^2 in Gram form
    (A^T A = C, l = n u) by the active-set method of Lawson & Hanson (Solving Least Squares
    Problems, 1974, ch. 23): free a variable whose gradient descends, solve the free block
    (least squares: a singular block has the right-hand side in its range), step back to the
    bound where that solution leaves z >= 0. Each free block's solution is exact; the loop
    ends at the KKT point (z >= 0, C (l + z) >= 0 on the bound, = 0 off it).
    A zero gradient takes no part (its constraint is void): it keeps v_k = u_k.
    """
    mm = np.asarray(m, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    v = u.copy()
    n = gram_norms(mm)
    live = np.flatnonzero(n > 0)
    if live.size == 0:
        return v
    nl = n[live]
    c = mm[np.ix_(live, live)] / np.outer(nl, nl)
    l = nl * u[live]
    k = len(live)
    q = c @ l  # the gradient of 1/2 |A (l + z)|^2 at z = 0
    tol = 64 * k * np.finfo(np.float64).eps * max(1.0, float(np.abs(l).sum()))
    z = np.zeros(k)
    free: list[int] = []
    steps = 0
    while steps < max_iter:
        steps += 1
        grad = c @ z + q
        bound = [j for j in range(k) if j not in free]
        if not bound:
            break
        j = min(bound, key=lambda i: grad[i])
        if not grad[j] < -tol:  # KKT: no variable on its bound can descend
            break
        free.append(j)
        while steps < max_iter:  # until the free block's least-squares solution is feasible
            steps += 1
            s = np.zeros(k)
            s[free] = np.linalg.lstsq(c[np.ix_(free, free)], -q[free], rcond=None)[0]
            if np.all(s[free] > 0):
                z = s
                break
            out = [i for i in free if s[i] <= 0]
            theta = min(z[i] / max(z[i] - s[i], 1e-300) for i in out)
            z = z + theta * (s - z)
            free = [i for i in free if z[i] > 0 and not (i in out and z[i] <= tol)]
            z[[i for i in range(k) if i not in free]] = 0.0
            if j not in free and theta == 0.0:  # the entering variable cannot move: optimal to rounding
                steps = max_iter
        v[live] = (l + z) / nl
    return v
