"""Random loss weighting (Lin et al., TMLR 2022).

Each step draws K standard normal samples and uses their softmax as the task weights
(they sum to 1). The draws come from a seeded generator whose state is JSON state, so a
resumed run draws the same weights, and every DDP rank draws the same ones.

The generator is a CPU one (its state is the same on any machine); the drawn weights go to
the losses' device with a non-blocking copy and are never read back: each step's weights
stay tensors (the log reads them with the losses, once per interval).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params
from mtlkit.step_context import to_device

from ._common import generator_state, set_generator_state


def scalar_times(weight: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``weight * loss`` in the loss's dtype, with the rounding of a Python float times the
    loss (the float64 weight rounded to the loss's compute type, float32 for half types)."""
    compute = torch.promote_types(loss.dtype, torch.float32)
    return (weight.to(compute) * loss.to(compute)).to(loss.dtype)


class RLWParams(Params):
    seed: int = Field(0, ge=0)


class RLW(Weighting):
    def __init__(self, params: RLWParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.generator = torch.Generator().manual_seed(int(params.seed))
        self._last: list = [1.0 / len(self.task_names)] * len(self.task_names)

    def sample_weights(self) -> torch.Tensor:
        return torch.softmax(torch.randn(len(self.task_names), generator=self.generator, dtype=torch.float64), 0)

    def combine(self, losses):
        w = self.sample_weights()  # drawn every step, present tasks or not: the stream stays in step
        if not any(t in losses for t in self.task_names):
            raise ValueError("weighting 'rlw': none of the tasks has a loss")
        first = next(iter(losses.values()))
        w = to_device(w, first.device)
        self._last = list(w.unbind())
        terms = [scalar_times(w[k], losses[t]) for k, t in enumerate(self.task_names) if t in losses]
        return sum(terms[1:], terms[0])

    def weights(self):
        return dict(zip(self.task_names, self._last))

    def get_state(self):
        return {"rng": generator_state(self.generator)}

    def set_state(self, state):
        set_generator_state(self.generator, state)


@hookimpl
def register_weightings(register):
    register(
        "rlw",
        RLW,
        params=RLWParams,
        description="Random loss weighting (Lin et al. 2022): softmax of normal samples each step",
    )
