"""Helpers shared by the weighting plugins (not a plugin itself: it registers nothing).

Gradient-level methods only ever need the K x K Gram matrix of the task gradients to find
their K weights, so they solve in that small space (float64, on the CPU, where a
solver's scalar loop does not pay a device sync per step) and touch the K x P gradient
matrix twice: once for the Gram matrix and once for the weighted sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.contracts import Weighting
from mtlkit.errors import ConfigError


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


def gram(grads: Tensor) -> Tensor:
    """G G^T of the K x P gradient matrix, as float64 on the CPU."""
    if grads.dtype not in (torch.float32, torch.float64):  # half precision would spoil the dot products
        grads = grads.float()
    return (grads @ grads.T).to(device="cpu", dtype=torch.float64)


def weighted_sum(weights: Tensor, grads: Tensor) -> Tensor:
    """sum_k weights[k] * grads[k], in the gradients' dtype and device."""
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of a vector onto the probability simplex (sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    # the last sorted entry that stays positive after the common shift fixes the shift
    rho = np.flatnonzero(u - css / np.arange(1, v.size + 1) > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def min_norm_2(v11: float, v12: float, v22: float) -> float:
    """Weight gamma of x1 in argmin_{gamma in [0, 1]} |gamma x1 + (1 - gamma) x2|^2, from dot products."""
    denom = v11 + v22 - 2.0 * v12
    if denom <= 1e-12 * (abs(v11) + abs(v22)) or denom <= 0:  # x1 == x2: every gamma gives the same point
        return 0.5
    return min(max((v22 - v12) / denom, 0.0), 1.0)


def min_norm_weights(m: Tensor, max_iter: int = 250, tol: float = 1e-6) -> Tensor:
    """Weights a on the simplex minimising a^T M a (the min-norm point of the convex hull).

    Starts, as Sener & Koltun's MGDA, from the best pair of vertices, then runs pairwise
    Frank-Wolfe: move weight from the active vertex with the largest directional derivative
    (M a)_v to the vertex with the smallest (M a)_s, with an exact line search. Unlike plain
    Frank-Wolfe, which zig-zags and cannot drop a vertex quickly, this converges linearly
    on the simplex. At the optimum every active vertex has the same (M a)_k, the minimum.
    """
    # numpy: the loop runs many tiny K-sized steps, where torch's per-op overhead dominates
    mm = m.detach().cpu().double().numpy()
    k = mm.shape[0]
    a = np.zeros(k)
    if k == 1:
        a[0] = 1.0
        return torch.from_numpy(a)
    best = None
    for i in range(k):
        for j in range(i + 1, k):
            g = min_norm_2(mm[i, i], mm[i, j], mm[j, j])
            cost = g * g * mm[i, i] + 2 * g * (1 - g) * mm[i, j] + (1 - g) ** 2 * mm[j, j]
            if best is None or cost < best[0]:
                best = (cost, i, j, g)
    _, i, j, g = best
    a[i], a[j] = g, 1.0 - g
    for _ in range(max_iter):
        ma = mm @ a
        s = int(np.argmin(ma))
        active = np.flatnonzero(a > 0)
        v = int(active[np.argmax(ma[active])])
        gap = float(ma[v] - ma[s])
        if s == v or gap <= tol * max(float(a @ ma), 1e-30):
            break
        # f(a + t (e_s - e_v)) is quadratic in t: exact minimiser, capped by the weight at v
        curv = float(mm[s, s] + mm[v, v] - 2 * mm[s, v])
        cap = float(a[v])
        step = cap if curv <= 1e-30 else min(gap / curv, cap)
        a[s] += step
        a[v] = 0.0 if step >= cap else a[v] - step  # a drop step removes v exactly
    return torch.from_numpy(a)


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-friendly list of bytes."""
    return [int(b) for b in gen.get_state().tolist()]


def set_generator_state(gen: torch.Generator, state: Any) -> None:
    gen.set_state(torch.tensor(list(state), dtype=torch.uint8))


class GramWeighting(Weighting):
    """Gradient-level methods that choose K coefficients from the K x K Gram matrix of the
    task gradients and return the coefficient-weighted sum of the gradients.

    Subclasses set ``method`` (its registered name, for errors) and implement
    ``coefficients(gram, losses)``; ``initial_coefficient`` (None: 1/K) is what ``weights()``
    reports before the first step.
    """

    requires_grads = "shared"
    method = "?"
    initial_coefficient: float | None = None

    def __init__(self, task_names: list[str]) -> None:
        super().__init__(task_names)
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
