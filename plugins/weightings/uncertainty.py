"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

loss = sum_k L_k / (2 exp(s_k)) + s_k / 2, with s_k = log sigma_k^2 one trained parameter
per task. The s_k live in ``parameters()``, so the engine's optimiser trains them and the
model checkpoint saves them; there is no JSON state.
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
    def __init__(self, params: UncertaintyParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(params.init)))

    def combine(self, losses):
        total = None
        for k, t in enumerate(self.task_names):
            if t not in losses:  # many-to-many: only the active task's term this step
                continue
            s = self.log_vars[k]
            term = 0.5 * torch.exp(-s) * losses[t] + 0.5 * s
            total = term if total is None else total + term
        if total is None:
            raise ValueError("weighting 'uncertainty': none of the tasks has a loss")
        return total

    def weights(self):
        # the factor in front of each L_k
        w = 0.5 * torch.exp(-self.log_vars.detach())
        return {t: float(w[k]) for k, t in enumerate(self.task_names)}


@hookimpl
def register_weightings(register):
    register(
        "uncertainty",
        Uncertainty,
        params=UncertaintyParams,
        description="Uncertainty weighting (Kendall et al.): learned log-variance per task",
    )
