"""IMTL: impartial multi-task learning (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang,
"Towards Impartial Multi-task Learning", ICLR 2021), the loss and gradient parts together.

IMTL-L (loss balance): each task loss is scaled as e^{s_k} L_k - s_k with a learned scale
s_k (a parameter of the weighting, 0 at the start, trained by the model's optimiser). Its
derivative in s_k, e^{s_k} L_k - 1, vanishes exactly where the scaled loss e^{s_k} L_k is 1:
the scales drive every task's scaled loss to the same value.

IMTL-G (gradient balance, ``imtl_g``): the shared parameters' update is the combination
sum_k alpha_k h_k of the scaled task gradients h_k = e^{s_k} g_k, alpha summing to 1, with
equal projections on every unit gradient. Task-specific parameters and the scales get the
gradient of the scaled losses.

``mode = "hybrid"`` (the paper's IMTL) does both, on either gradient target; ``"loss"`` is
IMTL-L alone, a loss-level method (one backward pass). IMTL-G alone is ``imtl_g``.

A task with no valid target in the batch (a zero loss) takes no part in the step: its
term e^{s_k} 0 - s_k would still push s_k up by the learning rate each such step. Hybrid:
the engine leaves it out of IMTL-G and of the scales' gradient; ``"loss"``
(``present_only``): the loss combines the tasks with a nonzero loss, and with none there
is no backward pass. Its scale then gets a zero gradient (or none): plain SGD leaves it as
it was, the run's momentum or weight decay may still move it, as they move its head.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import present_rows

from ._common import GramWeighting
from ._linalg_device import JacobiSolverParams
from .imtl_g import imtl_g_device, imtl_g_weights


class IMTLParams(JacobiSolverParams):
    mode: Literal["hybrid", "loss"] = "hybrid"  # IMTL (loss + gradient balance) or IMTL-L alone


class IMTL(GramWeighting):
    method = "imtl"
    present_only = True  # mode "loss": leave a task with a zero loss out of combine
    # hybrid: one read per step, IMTL-G's (see imtl_g), the scales packed into the same
    # transfer as the Gram matrix, or none with solver = "device" (the scales stay on the
    # device too); "loss" reads nothing (its weights stay on the device)

    def __init__(self, params: IMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.all_tasks = list(self.task_names)
        self.mode = params.mode
        if self.mode == "loss":
            if params.grad_target != "params":
                raise ConfigError("weighting 'imtl': grad_target applies to mode = \"hybrid\" (IMTL-L alone is loss-level)")
            if params.solver != "exact":
                raise ConfigError("weighting 'imtl': solver applies to mode = \"hybrid\" (IMTL-L alone solves nothing)")
            self.requires_grads = None  # loss-level: one backward of combine
            self.host_reads_per_step = 0
        self.log_scales = nn.Parameter(torch.zeros(len(self.task_names)))
        self.sweeps = params.sweeps
        self.use_solver(params.solver)

    def combine(self, losses):
        terms = []
        for k, t in enumerate(self.all_tasks):
            if t in losses:
                s = self.log_scales[k]
                terms.append(torch.exp(s) * losses[t] - s)
        if not terms:
            raise ValueError("weighting 'imtl': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def host_extra(self, losses):
        """The log scales s_k (every task's): read with the Gram matrix."""
        return self.log_scales

    def coefficients(self, m, extra):
        # e^{s_k} of the tasks in task_names (the present ones during a step that leaves some out)
        e = np.exp(extra[[self.all_tasks.index(t) for t in self.task_names]])
        alpha = imtl_g_weights(m * np.outer(e, e))  # IMTL-G on h_k = e^{s_k} g_k
        return alpha * e

    def device_coefficients(self, m, losses):
        # the same on the device: e^{s_k} of the tasks in task_names, never read
        s = present_rows(self.log_scales.detach(), self.all_tasks, self.task_names)
        e = s.to(m.device, torch.float64).exp()
        return imtl_g_device(m * (e[:, None] * e[None, :]), self.sweeps) * e

    def weights(self):
        if self.mode == "loss":  # over task_names: the present tasks after a step that left some out
            e = self.log_scales.detach().exp()  # a new tensor: the optimiser's in-place steps leave it be
            return {t: e[self.all_tasks.index(t)] for t in self.task_names}
        return super().weights()


@hookimpl
def register_weightings(register):
    register(
        "imtl",
        IMTL,
        params=IMTLParams,
        description="IMTL (Liu et al. 2021): learned loss scales (IMTL-L) + impartial gradient (IMTL-G)",
    )
