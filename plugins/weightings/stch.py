"""STCH: smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024).

The classic Tchebycheff scalarisation min max_k (f_k - z_k) optimises the worst task; its
smooth version is

    STCH_mu(f) = mu log sum_k exp((f_k - z_k) / mu),

which lies in [max_k (f_k - z_k), max_k (f_k - z_k) + mu log K] and tends to the max as
mu -> 0; its gradient weights the tasks by softmax((f - z) / mu). In multi-task learning
(the authors' setup, as in LibMTL): f_k = log(L_k / z_k) with the nadir z_k = the mean
training loss of task k over epoch ``warmup_epochs`` (0-based); until the end of that
epoch the loss is sum_k log L_k, then K STCH_mu(f) (the factor K keeps the update's scale
of the warm-up sum). mu = 1 and 4 warm-up epochs are the authors' defaults.
The nadir vector and the epoch are checkpoint state.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class STCHParams(Params):
    mu: float = Field(1.0, gt=0)  # smoothing: STCH -> max as mu -> 0
    warmup_epochs: int = Field(4, ge=0)  # epochs of sum log L before the nadir epoch
    eps: float = Field(1e-20, gt=0)  # added inside the logs


def smooth_tchebycheff(values: torch.Tensor, mu: float) -> torch.Tensor:
    """mu log sum_k exp(values_k / mu), computed stably."""
    return mu * torch.logsumexp(values / mu, dim=0)


class STCH(Weighting):
    def __init__(self, params: STCHParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.mu = float(params.mu)
        self.warmup = params.warmup_epochs
        self.eps = float(params.eps)
        self.epoch = 0
        self.nadir: dict[str, float] = {}  # z_k, set at the end of epoch ``warmup``
        self._last: dict[str, torch.Tensor] = {}

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        if epoch == self.warmup:
            self.nadir = {t: float(v) for t, v in mean_losses.items() if t in self.task_names}

    def combine(self, losses):
        present = [t for t in self.task_names if t in losses]
        if not present:
            raise ValueError("weighting 'stch': none of the tasks has a loss")
        if not all(t in self.nadir and self.nadir[t] > 0 for t in present) or self.epoch <= self.warmup:
            logs = torch.stack([torch.log(losses[t] + self.eps) for t in present])
            self._last = {t: 1.0 / (losses[t].detach() + self.eps) for t in present}
            return logs.sum()
        f = torch.stack([torch.log(losses[t] / self.nadir[t] + self.eps) for t in present])
        with torch.no_grad():  # the factor in front of each L_k, for the log
            soft = torch.softmax(f / self.mu, 0) * len(self.task_names)
            self._last = {t: soft[i] / (losses[t].detach() + self.eps * self.nadir[t]) for i, t in enumerate(present)}
        return len(self.task_names) * smooth_tchebycheff(f, self.mu)

    def weights(self):
        # 0-dim device tensors (new each step), read when the step is logged
        return {t: self._last[t] if t in self._last else 1.0 for t in self.task_names}

    def get_state(self):
        # the epoch too: a resume in mid-epoch does not call on_epoch_start again
        return {"nadir": dict(self.nadir), "epoch": self.epoch}

    def set_state(self, state):
        self.nadir = {str(t): float(v) for t, v in state.get("nadir", {}).items()}
        self.epoch = int(state.get("epoch", 0))
        bad = [t for t, v in self.nadir.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"weighting 'stch': non-finite nadir value for {bad}")


@hookimpl
def register_weightings(register):
    register(
        "stch",
        STCH,
        params=STCHParams,
        description="STCH (Lin et al. 2024): smooth Tchebycheff scalarisation of normalised log losses",
    )
