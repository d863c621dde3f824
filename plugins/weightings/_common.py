"""Helpers shared by the weighting plugins (not a plugin itself: it registers nothing).

Gradient-level methods only ever need the K x K Gram matrix of the task gradients to find
their K weights, so they solve in that small space (float64, on the CPU, where a
solver's scalar loop does not pay a device sync per step) and touch the K x P gradient
matrix twice: once for the Gram matrix and once for the weighted sum.

The Gram matrix is accumulated in float64 whatever the gradients' dtype (``gram``), and the
solvers work with norm-free quantities (correlations, cosines) wherever the gradient norms
would otherwise enter a linear solve or a stopping test: task gradient norms routinely
differ by orders of magnitude, and a solver tuned to the largest one ignores the rest.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.errors import ConfigError
from mtlkit.registry import Params


class GradTargetParams(Params):
    """Params of a method whose gradients can be taken on either target (every Gram method)."""

    grad_target: Literal["params", "features"] = Field(
        "params", description="Gradients of the shared parameters (params) or of the shared representation "
        "the network exposes (features: much cheaper, exact for the trunk's output).")


def require_tasks(method: str, task_names: list[str], minimum: int = 2) -> None:
    """Refuse a task count the method is not defined for (one-line ConfigError)."""
    if len(task_names) < minimum:
        raise ConfigError(
            f"weighting '{method}' needs at least {minimum} tasks, got {len(task_names)} "
            f"({', '.join(task_names) or 'none'})"
        )


def check_grads(method: str, grads: Tensor, task_names: list[str]) -> None:
    if grads.dim() != 2 or grads.shape[0] != len(task_names):
        raise ValueError(
            f"weighting '{method}': expected grads of shape ({len(task_names)}, P), got {tuple(grads.shape)}"
        )


# float64 elements converted at a time by ``gram``, which bounds its extra memory: on the CPU
# 1 MiB, so each chunk stays in cache (six times faster than 32 MiB chunks, whose fresh pages
# and cache misses dominated); on an accelerator 32 MiB (fewer kernel launches)
GRAM_CHUNK = 1 << 17
GRAM_CHUNK_DEVICE = 1 << 22


def gram(grads: Tensor, host: bool = True) -> Tensor:
    """G G^T of the K x P gradient matrix, accumulated in float64, returned on the CPU
    (``host``: the step's one read, for a host-side solver) or left on the gradients'
    device (``host=False``: for a method whose K x K arithmetic stays there).

    float32 dot products of long, near-collinear rows lose the small differences that the
    solvers care about (|g_i - g_j|^2 = M_ii + M_jj - 2 M_ij cancels); products of float32
    (or half) numbers are exact in float64, so accumulating there leaves only float64
    rounding. Columns are converted chunk by chunk so that no float64 copy of the whole
    K x P matrix is made, on the gradients' own device (the P-long work stays there).
    """
    if grads.dtype == torch.float64:
        out = grads @ grads.T
        return out.cpu() if host else out
    if grads.device.type == "mps":  # no float64 on Apple GPUs: accumulate on the CPU instead
        grads = grads.cpu()
    k, p = grads.shape
    out = torch.zeros(k, k, dtype=torch.float64, device=grads.device)
    step = max(1, (GRAM_CHUNK if grads.device.type == "cpu" else GRAM_CHUNK_DEVICE) // max(k, 1))
    for start in range(0, p, step):
        block = grads[:, start:start + step].to(torch.float64)
        out += block @ block.T
    return out.cpu() if host else out


def weighted_sum(weights: Tensor, grads: Tensor) -> Tensor:
    """sum_k weights[k] * grads[k], in the gradients' dtype and device."""
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads


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


def min_norm_weights(m: Tensor | np.ndarray, max_iter: int = 1000, tol: float = 1e-10) -> Tensor:
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
    mm = m.detach().cpu().double().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
    k = mm.shape[0]
    n = np.sqrt(np.maximum(np.diag(mm), 0.0))
    if not n.max() > 0:  # every point is 0: all weights give the same (zero) point
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    a = np.zeros(k)
    j = int(np.argmin(n))
    a[j] = 1.0
    if n[j] == 0:  # a zero point is the min-norm point
        return torch.from_numpy(a)
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
    return torch.from_numpy(a)


def cone_projection(m: Tensor | np.ndarray, u: np.ndarray, max_iter: int = 1000) -> np.ndarray:
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
    mm = m.detach().cpu().double().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    v = u.copy()
    n = np.sqrt(np.maximum(np.diag(mm), 0.0))
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


def sized_buffer(module: torch.nn.Module, name: str, rows: int, like: Tensor) -> Tensor:
    """The ``rows`` x P buffer ``name`` of ``module`` (registered in its ``__init__`` with
    P = 0), made zeros of the gradients' P, dtype and device on first use.

    Methods that keep P-long state across steps (MoCo, DB-MTL, ExcessMTL) hold it as buffers:
    the checkpoint saves them with the weighting (``weighting.<name>``), beside the model.
    """
    buf = getattr(module, name)
    p = like.shape[1]
    if buf.shape[1] == 0:
        buf = torch.zeros(rows, p, dtype=like.dtype, device=like.device)
        setattr(module, name, buf)
    elif buf.shape != (rows, p):
        raise ValueError(f"weighting: buffer '{name}' holds {tuple(buf.shape)}, the gradients are {rows} x {p}")
    return buf


def adam_step(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int | list[int] | Tensor, lr: float,
              betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              rows: list[int] | None = None) -> None:
    """One step of Adam (Kingma & Ba 2015; L2 weight decay added to the gradient, as
    ``torch.optim.Adam``) on the tensor ``x`` in place, with the moment buffers ``m`` and
    ``v``; ``t`` counts this step from 1 (or one count per entry stepped: a list, or a
    device tensor, read by nothing). For the small
    vectors a weighting learns with its own optimiser (FAMO's logits, GradNorm's and
    Auto-Lambda's weights): buffers, so the checkpoint carries them.

    ``rows``: step these entries only (``grad`` and a list ``t`` hold theirs, in order);
    the others (tasks left out of the step) keep their value and moments."""
    if rows is not None:
        index = torch.tensor(rows, dtype=torch.long, device=x.device)
        xs, ms, vs = x[index], m[index], v[index]
        adam_step(xs, grad, ms, vs, t, lr, betas, eps, weight_decay)
        x[index], m[index], v[index] = xs, ms, vs
        return
    if isinstance(t, Tensor):  # the corrections rounded to m's dtype, as a Python number's are
        c1, c2 = ((1 - b ** t.to(torch.float64)).to(m.dtype) for b in betas)
    else:
        if not isinstance(t, int):
            t = t[0] if len(set(t)) == 1 else torch.tensor(t, dtype=torch.float64, device=x.device)
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    g = grad + weight_decay * x if weight_decay else grad
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat = m / c1
    v_hat = v / c2
    x.sub_((lr * m_hat / (v_hat.sqrt() + eps)).to(x))


def task_steps(counts: list[int], rows: list[int]) -> list[int]:
    """Count one more Adam step for each of ``rows`` (indices into ``counts``, one per
    task); their counts, in order. A task left out of a step does not count it."""
    for k in rows:
        counts[k] += 1
    return [counts[k] for k in rows]


def step_counts(method: str, state: Any, k: int) -> list[int]:
    """Per-task step counts from JSON state: a list, or one int (older checkpoints)."""
    if isinstance(state, list):
        if len(state) != k:
            raise ValueError(f"weighting '{method}': state has {len(state)} step counts for {k} tasks")
        return [int(x) for x in state]
    return [int(state or 0)] * k


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-friendly list of bytes."""
    return [int(b) for b in gen.get_state().tolist()]


def set_generator_state(gen: torch.Generator, state: Any) -> None:
    gen.set_state(torch.tensor(list(state), dtype=torch.uint8))


class GramWeighting(Weighting):
    """Gradient-level methods that choose K coefficients from the K x K Gram matrix of the
    task gradients (float64, see ``gram``) and return the coefficient-weighted sum of the
    gradients.

    Subclasses set ``method`` (its registered name, for errors) and implement
    ``coefficients(gram, losses)``; ``initial_coefficient`` (None: 1/K) is what ``weights()``
    reports before the first step.
    """

    requires_grads = "shared"
    grad_targets = ("params", "features")
    method = "?"
    initial_coefficient: float | None = None

    def __init__(self, task_names: list[str], grad_target: str = "params") -> None:
        super().__init__(task_names)
        self.grad_target = grad_target
        require_tasks(self.method, self.task_names, 2)
        k = len(self.task_names)
        self._coefs = [1.0 / k if self.initial_coefficient is None else self.initial_coefficient] * k

    def coefficients(self, m: Tensor, losses) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def combine_grads(self, grads: Tensor, losses) -> Tensor:
        check_grads(self.method, grads, self.task_names)
        coef = self.coefficients(gram(grads), losses)
        self._coefs = coef.tolist()
        return weighted_sum(coef, grads)

    def weights(self):
        return dict(zip(self.task_names, self._coefs))
