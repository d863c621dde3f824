"""Random loss weighting (Lin et al., TMLR 2022).

Each step draws K standard normal samples and uses their softmax as the task weights
(they sum to 1). The draws come from a seeded generator whose state is JSON state, so a
resumed run draws the same weights, and every DDP rank draws the same ones.
"""

from __future__ import annotations

import torch

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from ._common import generator_state, set_generator_state


class RLWParams(Params):
    seed: int = 0


class RLW(Weighting):
    def __init__(self, params: RLWParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.generator = torch.Generator().manual_seed(int(params.seed))
        self._last = [1.0 / len(self.task_names)] * len(self.task_names)

    def sample_weights(self) -> torch.Tensor:
        return torch.softmax(torch.randn(len(self.task_names), generator=self.generator, dtype=torch.float64), 0)

    def combine(self, losses):
        w = self.sample_weights()
        self._last = w.tolist()
        terms = [float(w[k]) * losses[t] for k, t in enumerate(self.task_names) if t in losses]
        if not terms:
            raise ValueError("weighting 'rlw': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def weights(self):
        return dict(zip(self.task_names, self._last))

    def get_state(self):
        return {"rng": generator_state(self.generator)}

    def set_state(self, state):
        if "rng" in state:
            set_generator_state(self.generator, state["rng"])


@hookimpl
def register_weightings(register):
    register(
        "rlw",
        RLW,
        params=RLWParams,
        description="Random loss weighting (Lin et al. 2022): softmax of normal samples each step",
    )
