"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

The update d maximises the worst task improvement min_i g_i . d within the ball
|d - g0| <= c |g0| around the mean gradient g0. Its dual is a problem over the simplex,

    min_w  F(w) = g_w . g0 + c |g0| |g_w|,   g_w = sum_i w_i g_i,

solved here by projected gradient descent with backtracking on the K weights (F is
convex: a linear term plus a norm). Then d = g0 + c |g0| g_w / |g_w|, divided by 1 + c^2
by default (``rescale``, as in the authors' experiments). c = 0 gives the mean gradient.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtlkit.hookspecs import hookimpl

from ._common import GramWeighting, project_simplex


class CAGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    c: float = Field(0.4, ge=0)  # radius of the ball around g0, relative to |g0|
    rescale: Literal["none", "1+c^2", "1+c"] = "1+c^2"  # divisor of the final update
    max_iter: int = Field(500, ge=1)  # projected-gradient iterations at most
    tol: float = Field(1e-9, gt=0)  # stop when the weights move less than this


def solve_dual(m: np.ndarray, c: float, max_iter: int = 500, tol: float = 1e-9) -> np.ndarray:
    """argmin over the simplex of w^T M b + c sqrt(b^T M b) sqrt(w^T M w), b = 1/K."""
    k = m.shape[0]
    scale = float(np.trace(m)) / k
    w = np.full(k, 1.0 / k)
    if scale <= 0 or c == 0:
        return w
    m = m / scale  # F is homogeneous in M: same minimiser, step sizes independent of |g|
    mb = m @ w  # w starts at b
    c_abs = c * np.sqrt(max(float(w @ mb), 0.0))
    # a tiny floor under |g_w|^2 keeps F differentiable where g_w = 0 (0 in the hull)
    floor = 1e-12

    def value_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        mx = m @ x
        norm = np.sqrt(max(float(x @ mx), 0.0) + floor)
        return float(x @ mb) + c_abs * norm, mb + c_abs * mx / norm

    f, g = value_grad(w)
    step = 1.0
    for _ in range(max_iter):
        # stationarity: a unit projected-gradient step no longer moves w (M is normalised,
        # so a unit step is on the problem's scale)
        if np.abs(project_simplex(w - g) - w).max() < tol:
            break
        while True:
            new = project_simplex(w - step * g)
            diff = new - w
            f_new, g_new = value_grad(new)
            # sufficient decrease for the projected step (standard backtracking test)
            if f_new <= f + g @ diff + (diff @ diff) / (2 * step) + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        w, f, g = new, f_new, g_new
        step = min(step * 2.0, 1e6)  # let the step grow again after a successful one, within reason
    return w


class CAGrad(GramWeighting):
    method = "cagrad"

    def __init__(self, params: CAGradParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.c = float(params.c)
        self.rescale = params.rescale
        self.max_iter = params.max_iter
        self.tol = params.tol

    def coefficients(self, m: torch.Tensor, losses=None) -> torch.Tensor:
        """Coefficients of the update d = coef @ grads, from the Gram matrix."""
        mm = m.numpy()
        k = mm.shape[0]
        b = np.full(k, 1.0 / k)
        coef = b.copy()
        if self.c > 0:
            w = solve_dual(mm, self.c, self.max_iter, self.tol)
            g0_norm = np.sqrt(max(float(b @ mm @ b), 0.0))
            gw_norm = np.sqrt(max(float(w @ mm @ w), 0.0))
            if gw_norm > 1e-12 * max(g0_norm, 1e-30):  # g_w = 0: the direction is undefined, keep g0
                coef = coef + self.c * g0_norm / gw_norm * w
        if self.rescale == "1+c^2":
            coef = coef / (1.0 + self.c**2)
        elif self.rescale == "1+c":
            coef = coef / (1.0 + self.c)
        return torch.from_numpy(coef)


@hookimpl
def register_weightings(register):
    register(
        "cagrad",
        CAGrad,
        params=CAGradParams,
        description="CAGrad (Liu et al. 2021): best worst-case improvement near the mean gradient",
    )
