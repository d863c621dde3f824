"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of task gradients.

Weights a on the simplex minimise |sum_k a_k g_k / n_k|^2, solved exactly on the K x K Gram
matrix by Wolfe's active-set method (``_common.min_norm_weights``; the authors' Frank-Wolfe
stops short of the optimum for many conflicting tasks), where n_k is the optional normaliser:
``none`` (1), ``l2`` (|g_k|), ``loss`` (L_k) or ``loss+`` (L_k |g_k|). As in the authors'
release, the weights found on the normalised gradients scale the raw gradients: the
update is sum_k a_k g_k. Task-specific parameters get the plain sum of losses (each head
its own loss), the usual convention of gradient-level methods.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, GramWeighting, min_norm_weights


class MGDAParams(GradTargetParams):
    normalization: Literal["none", "l2", "loss", "loss+"] = "none"
    max_iter: int = Field(1000, ge=1)  # safeguard only: the active-set method ends in finitely many steps
    tol: float = Field(1e-10, gt=0)  # KKT tolerance, a cosine (see _common.kkt_violation)


class MGDA(GramWeighting):
    method = "mgda"

    def __init__(self, params: MGDAParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.normalization = params.normalization
        self.max_iter = params.max_iter
        self.tol = params.tol

    def normalizers(self, m: torch.Tensor, losses) -> torch.Tensor:
        k = m.shape[0]
        norms = torch.sqrt(torch.diagonal(m).clamp_min(0.0))
        if self.normalization == "none":
            n = torch.ones(k, dtype=torch.float64)
        elif self.normalization == "l2":
            n = norms
        else:
            loss = torch.tensor([float(losses[t].detach()) for t in self.task_names], dtype=torch.float64)
            n = loss if self.normalization == "loss" else loss * norms
        # a zero normaliser (zero gradient or loss) would divide by zero: leave that task unscaled
        return torch.where(n > 1e-20, n, torch.ones_like(n))

    def coefficients(self, m: torch.Tensor, losses) -> torch.Tensor:
        n = self.normalizers(m, losses)
        return min_norm_weights(m / torch.outer(n, n), max_iter=self.max_iter, tol=self.tol)


@hookimpl
def register_weightings(register):
    register(
        "mgda",
        MGDA,
        params=MGDAParams,
        description="MGDA (Sener & Koltun 2018): min-norm point of the task gradients' convex hull",
    )
