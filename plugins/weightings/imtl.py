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

import torch
from torch import nn

from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, GramWeighting, check_grads, gram, weighted_sum
from .imtl_g import imtl_g_weights


class IMTLParams(GradTargetParams):
    mode: Literal["hybrid", "loss"] = "hybrid"  # IMTL (loss + gradient balance) or IMTL-L alone


class IMTL(GramWeighting):
    method = "imtl"
    present_only = True  # mode "loss": leave a task with a zero loss out of combine

    def __init__(self, params: IMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.all_tasks = list(self.task_names)
        self.mode = params.mode
        if self.mode == "loss":
            if params.grad_target != "params":
                raise ConfigError("weighting 'imtl': grad_target applies to mode = \"hybrid\" (IMTL-L alone is loss-level)")
            self.requires_grads = None  # loss-level: one backward of combine
        self.log_scales = nn.Parameter(torch.zeros(len(self.task_names)))

    def scales(self) -> torch.Tensor:
        """e^{s_k} of the tasks in ``task_names`` (float64, on the CPU)."""
        s = self.log_scales.detach().to("cpu", torch.float64).exp()
        return s[[self.all_tasks.index(t) for t in self.task_names]]

    def combine(self, losses):
        terms = []
        for k, t in enumerate(self.all_tasks):
            if t in losses:
                s = self.log_scales[k]
                terms.append(torch.exp(s) * losses[t] - s)
        if not terms:
            raise ValueError("weighting 'imtl': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def combine_grads(self, grads, losses):
        check_grads(self.method, grads, self.task_names)
        e = self.scales()
        alpha = imtl_g_weights(gram(grads) * torch.outer(e, e))  # IMTL-G on h_k = e^{s_k} g_k
        coef = alpha * e
        self._coefs = coef.tolist()
        return weighted_sum(coef, grads)

    def weights(self):
        if self.mode == "loss":  # over task_names: the present tasks after a step that left some out
            e = dict(zip(self.all_tasks, self.log_scales.detach().exp().tolist()))
            return {t: e[t] for t in self.task_names}
        return dict(zip(self.task_names, self._coefs))


@hookimpl
def register_weightings(register):
    register(
        "imtl",
        IMTL,
        params=IMTLParams,
        description="IMTL (Liu et al. 2021): learned loss scales (IMTL-L) + impartial gradient (IMTL-G)",
    )
