"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of task gradients.

Weights a on the simplex minimise |sum_k a_k g_k / n_k|^2, solved exactly on the K x K Gram
matrix by Wolfe's active-set method (``_active_set.min_norm_weights``; the authors' Frank-Wolfe
stops short of the optimum for many conflicting tasks), where n_k is the optional normaliser:
``none`` (1), ``l2`` (|g_k|), ``loss`` (L_k) or ``loss+`` (L_k |g_k|). As in the authors'
release, the weights found on the normalised gradients scale the raw gradients: the
update is sum_k a_k g_k. Task-specific parameters get the plain sum of losses (each head
its own loss), the usual convention of gradient-level methods.

``solver = "device"`` finds the same weights on the gradients' device, without reading
anything back (``_simplex_device.min_norm_weights_device``: every support at once, exact to
rounding, up to ``MAX_TASKS`` = 12 tasks); the normalisers are formed there from the
Gram matrix's diagonal and the loss tensors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mtlkit.hookspecs import hookimpl

from ._active_set import min_norm_weights
from ._common import GramWeighting, SolverParams, gram_norms
from ._simplex_device import SOLVER_DESCRIPTION, min_norm_weights_device, require_enumerable


class MGDAParams(SolverParams):
    solver: Literal["exact", "device"] = Field("exact", description=SOLVER_DESCRIPTION)
    normalization: Literal["none", "l2", "loss", "loss+"] = "none"
    # the exact solver's; the device solver has no iteration count or tolerance
    max_iter: int = Field(1000, ge=1)  # safeguard only: the active-set method ends in finitely many steps
    tol: float = Field(1e-10, gt=0)  # KKT tolerance, a cosine (see _active_set.kkt_violation)


class MGDA(GramWeighting):
    method = "mgda"

    def __init__(self, params: MGDAParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.use_solver(params.solver)
        require_enumerable(self.method, params.solver, len(self.task_names))
        self.normalization = params.normalization
        self.max_iter = params.max_iter
        self.tol = params.tol

    def host_extra(self, losses):
        """The losses, for the loss normalisations: read with the Gram matrix."""
        if self.normalization in ("loss", "loss+"):
            return torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in self.task_names])
        return None

    def normalizers(self, norms, loss):
        """n_k from the gradient norms and the losses: numpy arrays (exact solver) or
        tensors on the device (device solver) alike."""
        on_device = isinstance(norms, torch.Tensor)
        where, ones = (torch.where, torch.ones_like) if on_device else (np.where, np.ones_like)
        if self.normalization == "none":
            return ones(norms)
        if self.normalization == "l2":
            n = norms
        else:
            n = loss if self.normalization == "loss" else loss * norms
        # a zero normaliser (zero gradient or loss) would divide by zero: leave that task unscaled
        return where(n > 1e-20, n, 1.0)

    def coefficients(self, m: np.ndarray, extra: np.ndarray) -> np.ndarray:
        n = self.normalizers(gram_norms(m), extra)
        return min_norm_weights(m / np.outer(n, n), max_iter=self.max_iter, tol=self.tol)

    def device_coefficients(self, m: torch.Tensor, losses) -> torch.Tensor:
        loss = self.host_extra(losses)
        n = self.normalizers(m.diagonal().clamp(min=0).sqrt(), None if loss is None else loss.to(m.device))
        return min_norm_weights_device(m / (n[:, None] * n[None, :]))


@hookimpl
def register_weightings(register):
    register(
        "mgda",
        MGDA,
        params=MGDAParams,
        description="MGDA (Sener & Koltun 2018): min-norm point of the task gradients' convex hull",
    )
