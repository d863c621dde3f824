"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020).

For each task gradient g_i, visit the other tasks j in a random order; whenever the running
g_i conflicts with the ORIGINAL g_j (g_i . g_j < 0), remove that component:
g_i -= (g_i . g_j) / |g_j|^2 g_j. The update is the sum (or mean) of the projected gradients.

Every projected g_i stays a combination of the original gradients, so the projections run
on K coefficients against the Gram matrix; the P-long vectors are touched only at the end.
"""

from __future__ import annotations

from typing import Literal

import torch

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from ._common import GradTargetParams, check_grads, generator_state, gram, require_tasks, set_generator_state, weighted_sum


class PCGradParams(GradTargetParams):
    reduction: Literal["sum", "mean"] = "sum"  # how the projected gradients are combined
    seed: int = 0  # seeds the generator of the projection order (same on every DDP rank)


class PCGrad(Weighting):
    requires_grads = "shared"
    grad_targets = ("params", "features")

    def __init__(self, params: PCGradParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.grad_target = params.grad_target
        require_tasks("pcgrad", self.task_names, 2)
        self.reduction = params.reduction
        self.generator = torch.Generator().manual_seed(int(params.seed))
        self._coefs: list[float] = [1.0] * len(self.task_names)

    def projection_order(self, i: int) -> list[int]:
        """The order in which task i is projected against the others (draws from the generator)."""
        others = [j for j in range(len(self.task_names)) if j != i]
        perm = torch.randperm(len(others), generator=self.generator).tolist()
        return [others[p] for p in perm]

    def coefficients(self, m: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
        """Weights c with sum_i projected g_i = c @ grads, given the Gram matrix and orders."""
        k = m.shape[0]
        total = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            c = torch.zeros(k, dtype=torch.float64)
            c[i] = 1.0
            for j in orders[i]:
                dot = float(c @ m[:, j])  # (current g_i) . (original g_j)
                if dot < 0 and m[j, j] > 0:
                    c[j] -= dot / float(m[j, j])
            total += c
        if self.reduction == "mean":
            total /= k
        return total

    def combine_grads(self, grads, losses):
        check_grads("pcgrad", grads, self.task_names)
        orders = [self.projection_order(i) for i in range(len(self.task_names))]
        coefs = self.coefficients(gram(grads), orders)
        self._coefs = coefs.tolist()
        return weighted_sum(coefs, grads)

    def combine(self, losses):
        # task-specific parameters: each head gets its own loss, scaled like the shared update
        total = sum(losses[t] for t in self.task_names if t in losses)
        return total / len(self.task_names) if self.reduction == "mean" else total

    def weights(self):
        # the effective coefficient of each original gradient in the last update
        return dict(zip(self.task_names, self._coefs))

    def get_state(self):
        return {"rng": generator_state(self.generator)}

    def set_state(self, state):
        if "rng" in state:
            set_generator_state(self.generator, state["rng"])


@hookimpl
def register_weightings(register):
    register(
        "pcgrad",
        PCGrad,
        params=PCGradParams,
        description="PCGrad (Yu et al. 2020): project away conflicting gradient components",
    )
