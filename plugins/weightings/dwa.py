"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, section 4.1.3).

lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T), w_k(t-1) = Lbar_k(t-1) / Lbar_k(t-2),
Lbar_k(t) the mean unweighted training loss of task k over epoch t; weights 1 for the first
two epochs (t = 0, 1 here, epochs being 0-based). Weights are computed once, when an epoch
starts, from the history ``on_epoch_end`` records; the history is JSON state, so a resumed
run computes the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class DWAParams(Params):
    temperature: float = Field(2.0, gt=0)  # T; larger T flattens the weights towards 1


class DWA(Weighting):
    # CUDA graphs (training.cuda_graph): the weights change at epoch starts only, and the
    # graphs are captured anew each epoch
    graph_safe = True

    def __init__(self, params: DWAParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.temperature = float(params.temperature)
        # epoch (as str: JSON keys) -> {task: mean unweighted training loss}
        self.history: dict[str, dict[str, float]] = {}
        self.lambdas: list[float] = [1.0] * len(self.task_names)

    def _ratio(self, task: str, epoch: int) -> float:
        prev = self.history.get(str(epoch - 1), {}).get(task)
        prev2 = self.history.get(str(epoch - 2), {}).get(task)
        # a task without both means (not trained in one of the epochs) or a degenerate
        # zero/non-finite mean gets the neutral ratio 1 rather than a NaN weight
        if prev is None or prev2 is None or not (math.isfinite(prev) and math.isfinite(prev2)) or prev2 <= 0:
            return 1.0
        return prev / prev2

    def compute_lambdas(self, epoch: int) -> list[float]:
        k = len(self.task_names)
        if epoch < 2:
            return [1.0] * k
        w = [self._ratio(t, epoch) / self.temperature for t in self.task_names]
        top = max(w)  # shift before exp: same softmax, no overflow
        e = [math.exp(x - top) for x in w]
        s = sum(e)
        return [k * x / s for x in e]

    def on_epoch_start(self, epoch: int) -> None:
        self.lambdas = self.compute_lambdas(epoch)

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        self.history[str(epoch)] = {t: float(v) for t, v in mean_losses.items()}
        # only the last two epochs are ever read: keep the state small
        for key in [key for key in self.history if int(key) < epoch - 1]:
            del self.history[key]

    def combine(self, losses):
        terms = [self.lambdas[k] * losses[t] for k, t in enumerate(self.task_names) if t in losses]
        if not terms:
            raise ValueError("weighting 'dwa': none of the tasks has a loss")
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]

    def weights(self):
        return dict(zip(self.task_names, self.lambdas))

    def get_state(self):
        return {"history": {e: dict(v) for e, v in self.history.items()}, "lambdas": list(self.lambdas)}

    def set_state(self, state):
        self.history = {str(e): {t: float(x) for t, x in v.items()} for e, v in state.get("history", {}).items()}
        lambdas = state.get("lambdas")
        if lambdas is not None:
            if len(lambdas) != len(self.task_names):
                raise ValueError(
                    f"weighting 'dwa': state has {len(lambdas)} weights for {len(self.task_names)} tasks"
                )
            self.lambdas = [float(x) for x in lambdas]


@hookimpl
def register_weightings(register):
    register(
        "dwa",
        DWA,
        params=DWAParams,
        description="Dynamic Weight Average (Liu et al. 2019): softmax of last two epochs' loss ratios",
    )
