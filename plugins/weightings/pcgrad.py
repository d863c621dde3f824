"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020).

For each task gradient g_i, visit the other tasks j in a random order; whenever the running
g_i conflicts with the ORIGINAL g_j (g_i . g_j < 0), remove that component:
g_i -= (g_i . g_j) / |g_j|^2 g_j. The update is the sum (or mean) of the projected gradients.

Every projected g_i stays a combination of the original gradients, so the projections run
on K coefficients against the Gram matrix; the P-long vectors are touched only at the end.
The K tasks' projections are independent (each is against the original g_j), so they run
side by side: K x K coefficients, one visit of every task per round, on the Gram's device
with the conflict test as a mask (no value is read back during the step). The orders are
drawn on the host, from the seeded generator, and only used as an index.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import to_device

from ._common import GradTargetParams, check_grads, generator_state, gram, require_tasks, set_generator_state, weighted_sum


class PCGradParams(GradTargetParams):
    reduction: Literal["sum", "mean"] = "sum"  # how the projected gradients are combined
    seed: int = Field(0, ge=0)  # seeds the generator of the projection order (same on every DDP rank)


class PCGrad(Weighting):
    requires_grads = "shared"
    grad_targets = ("params", "features")

    def __init__(self, params: PCGradParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.grad_target = params.grad_target
        require_tasks("pcgrad", self.task_names, 2)
        self.reduction = params.reduction
        self.generator = torch.Generator().manual_seed(int(params.seed))
        # the last step's coefficients: a device tensor, read with the losses once per log interval
        self._coefs: torch.Tensor | list[float] = [1.0] * len(self.task_names)

    def projection_order(self, i: int) -> torch.Tensor:
        """The order in which task i is projected against the others (draws from the
        generator): a CPU tensor of task indices, never read as Python values."""
        k = len(self.task_names)
        others = torch.tensor([j for j in range(k) if j != i], dtype=torch.long)
        return others[torch.randperm(k - 1, generator=self.generator)]

    def coefficients(self, m: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Weights c with sum_i projected g_i = c @ grads, given the Gram matrix and the
        K x (K - 1) orders (row i: the tasks g_i is projected against, in turn)."""
        k = m.shape[0]
        orders = to_device(orders, m.device, torch.long)
        diag = torch.diagonal(m)
        c = torch.eye(k, dtype=torch.float64, device=m.device)  # row i: the running g_i
        for s in range(orders.shape[1]):
            j = orders[:, s:s + 1]  # K x 1: the task each g_i meets in round s
            dot = (c @ m).gather(1, j)  # (current g_i) . (original g_j)
            mjj = diag[j]
            conflict = (dot < 0) & (mjj > 0)
            c.scatter_add_(1, j, torch.where(conflict, -dot / torch.where(conflict, mjj, 1.0), 0.0))
        total = c.sum(0)
        if self.reduction == "mean":
            total /= k
        return total

    def combine_grads(self, grads, losses):
        check_grads("pcgrad", grads, self.task_names)
        k = len(self.task_names)
        orders = torch.stack([torch.as_tensor(self.projection_order(i), dtype=torch.long).reshape(k - 1)
                              for i in range(k)])
        coefs = self.coefficients(gram(grads, host=False), orders)
        self._coefs = coefs
        return weighted_sum(coefs, grads)

    def combine(self, losses):
        # task-specific parameters: each head gets its own loss, scaled like the shared update
        total = sum(losses[t] for t in self.task_names if t in losses)
        return total / len(self.task_names) if self.reduction == "mean" else total

    def weights(self):
        # the effective coefficient of each original gradient in the last update (0-dim tensors)
        return dict(zip(self.task_names, self._coefs))

    def get_state(self):
        return {"rng": generator_state(self.generator)}

    def set_state(self, state):
        set_generator_state(self.generator, state)


@hookimpl
def register_weightings(register):
    register(
        "pcgrad",
        PCGrad,
        params=PCGradParams,
        description="PCGrad (Yu et al. 2020): project away conflicting gradient components",
    )
