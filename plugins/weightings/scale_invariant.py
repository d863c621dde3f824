"""Scale-invariant loss (the baseline in Navon et al. 2022): loss = sum_k log L_k.

The gradient of log L_k is grad L_k / L_k, so each task is weighted by its inverse loss and
rescaling a loss by a constant does not change the update.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class ScaleInvariantParams(Params):
    eps: float = Field(1e-12, gt=0)  # losses are clamped to >= eps before the log (a zero loss gives -inf)


class ScaleInvariant(Weighting):
    graph_safe = True  # CUDA graphs (training.cuda_graph): device arithmetic on the step's losses only

    def __init__(self, params: ScaleInvariantParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.eps = float(params.eps)
        # detached losses of the last step; turned into floats only when logged (no device sync per step)
        self._last: dict[str, torch.Tensor] = {}

    def combine(self, losses):
        terms = []
        for k, t in enumerate(self.task_names):
            if t in losses:
                loss = losses[t]
                self._last[t] = loss.detach()
                terms.append(torch.log(loss.clamp_min(self.eps)))
        if not terms:
            raise ValueError("weighting 'scale_invariant': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def weights(self):
        # the effective weight 1 / L_k of each task's gradient at the last step: 0-dim device
        # tensors (float64, as the float arithmetic this replaces), read when the step is logged
        return {t: 1.0 / self._last[t].double().clamp_min(self.eps) if t in self._last else 1.0
                for t in self.task_names}


@hookimpl
def register_weightings(register):
    register(
        "scale_invariant",
        ScaleInvariant,
        params=ScaleInvariantParams,
        description="Scale-invariant loss: sum of log task losses",
    )
