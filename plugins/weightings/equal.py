"""Equal weighting: loss = sum of task losses (every weight 1)."""

from __future__ import annotations

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class EqualParams(Params):
    mean: bool = False  # divide by K (weights 1/K) instead of summing


class Equal(Weighting):
    graph_safe = True  # CUDA graphs (training.cuda_graph): constant weights

    def __init__(self, params: EqualParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.mean = params.mean

    def combine(self, losses):
        total = sum(losses[t] for t in self.task_names if t in losses)
        return total / len(self.task_names) if self.mean else total

    def weights(self):
        w = 1.0 / len(self.task_names) if self.mean else 1.0
        return {t: w for t in self.task_names}


@hookimpl
def register_weightings(register):
    register("equal", Equal, params=EqualParams, description="Equal weights (sum of task losses)")
