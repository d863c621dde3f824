"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

loss = sum_k L_k / (2 exp(s_k)) + s_k / 2, with s_k = log sigma_k^2 one trained parameter
per task. The s_k live in ``parameters()``, so the engine's optimiser trains them and the
model checkpoint saves them; there is no JSON state.

A task with no valid target in the batch has a zero loss; its regulariser s_k / 2 would
still pull s_k down (gradient 1/2), so the regulariser is multiplied by a presence mask
(L_k != 0, detached) kept on the device: such a task gives s_k no gradient, without a
read of the loss's value.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class UncertaintyParams(Params):
    init: float = -0.5  # initial s_k = log sigma_k^2 (the MTAN release; later work uses -0.7)


class Uncertainty(Weighting):
    graph_safe = True  # CUDA graphs (training.cuda_graph): its log-variances are parameters, updated on the device

    def __init__(self, params: UncertaintyParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(params.init)))

    def combine(self, losses):
        total = None
        for k, t in enumerate(self.task_names):
            if t not in losses:  # many-to-many: only the active task's term this step
                continue
            s = self.log_vars[k]
            # 1 where the task has a loss, 0 on a zero loss (no valid target): a device-side
            # mask, no read. Under torchrun it is this rank's own loss (combine sees no
            # other): the engine averages d/ds_k over the R ranks, giving
            # (R_k / R) (1/2 - e^-s_k mean_k L / 2), R_k the ranks with a target for task k
            # and mean_k L their mean loss (the others' L_k is 0). So s_k still tends to the
            # log of the loss where the task has targets (a mask of the global loss would
            # pull it to log((R_k / R) mean_k L)), its step scaled by R_k / R like the
            # trunk's gradient from that task; with R_k = 0 or R it is the one-process step.
            present = (losses[t].detach() != 0).to(s.dtype)
            term = 0.5 * torch.exp(-s) * losses[t] + 0.5 * s * present
            total = term if total is None else total + term
        if total is None:
            raise ValueError("weighting 'uncertainty': none of the tasks has a loss")
        return total

    def weights(self):
        # the factor in front of each L_k, as 0-dim device tensors (read when logged);
        # a new tensor, so the optimiser's in-place update of log_vars does not change it
        w = 0.5 * torch.exp(-self.log_vars.detach())
        return {t: w[k] for k, t in enumerate(self.task_names)}


@hookimpl
def register_weightings(register):
    register(
        "uncertainty",
        Uncertainty,
        params=UncertaintyParams,
        description="Uncertainty weighting (Kendall et al.): learned log-variance per task",
    )
