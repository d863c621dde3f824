"""Geometric loss strategy (Chennupati et al. 2019): loss = (prod_k L_k)^(1/K).

Computed as exp(mean_k log L_k), which equals the geometric mean without the product
under- or overflowing for many tasks. Its gradient weights task k by GLS / (K L_k).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class GLSParams(Params):
    eps: float = Field(1e-12, gt=0)  # losses are clamped to >= eps before the log


class GLS(Weighting):
    def __init__(self, params: GLSParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.eps = float(params.eps)
        # detached losses and value of the last step; turned into floats only when logged
        self._last: dict[str, torch.Tensor] = {}
        self._last_value: torch.Tensor | None = None

    def combine(self, losses):
        idx = [k for k, t in enumerate(self.task_names) if t in losses]
        if not idx:
            raise ValueError("weighting 'gls': none of the tasks has a loss")
        # the mean runs over the tasks present this step (all of them in one-to-many)
        logs = torch.stack([torch.log(losses[self.task_names[k]].clamp_min(self.eps)) for k in idx])
        out = torch.exp(logs.mean())
        self._last = {self.task_names[k]: losses[self.task_names[k]].detach() for k in idx}
        self._last_value = out.detach()
        return out

    def weights(self):
        # the effective weight dGLS/dL_k at the last step
        if self._last_value is None:
            return {t: 1.0 / len(self.task_names) for t in self.task_names}
        # 0-dim device tensors in float64 (the arithmetic of Python floats), read when logged
        value, n = self._last_value.double(), len(self._last)
        return {t: value / (n * self._last[t].double().clamp_min(self.eps)) if t in self._last else 0.0
                for t in self.task_names}


@hookimpl
def register_weightings(register):
    register("gls", GLS, params=GLSParams, description="Geometric loss strategy: geometric mean of task losses")
