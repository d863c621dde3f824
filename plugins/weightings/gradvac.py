"""GradVac: gradient vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating
and Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

Each task pair (i, j) keeps an exponential moving average phi_ij of the cosine between
g_i and g_j (starting at 0). For each task i, visit the other tasks j in a random order;
with phi = cos(g_i', g_j) for the running g_i' and the original g_j: if phi < phi_ij,
add to g_i' the multiple of g_j that raises the cosine to exactly phi_ij,

    g_i' += |g_i'| (phi_ij sqrt(1 - phi^2) - phi sqrt(1 - phi_ij^2)) / (|g_j| sqrt(1 - phi_ij^2)) g_j,

then phi_ij <- (1 - beta) phi_ij + beta phi. The update is the sum of the adjusted
gradients. beta = 0.01, our reading of the paper's setting (LibMTL and torchjd default
to 0.5; set beta = 0.5 to match them). The whole shared parameter
vector is one group (the paper also adjusts per layer; not offered here).

Like PCGrad, every adjusted g_i stays a combination of the original gradients, so the
adjustment runs on K coefficients against the Gram matrix. The targets and the generator
of the visiting order are checkpoint state; the order's seed is the same on every rank.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl

from ._common import GradTargetParams, check_grads, generator_state, gram, require_tasks, set_generator_state, weighted_sum


class GradVacParams(GradTargetParams):
    beta: float = Field(0.01, gt=0, le=1)  # EMA rate of the target cosines
    seed: int = 0  # seeds the visiting order (same on every DDP rank)


class GradVac(Weighting):
    requires_grads = "shared"
    grad_targets = ("params", "features")

    def __init__(self, params: GradVacParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.grad_target = params.grad_target
        require_tasks("gradvac", self.task_names, 2)
        self.beta = float(params.beta)
        self.generator = torch.Generator().manual_seed(int(params.seed))
        # EMA target cosine of each ordered task pair, by name: targets[i][j]
        self.targets: dict[str, dict[str, float]] = {}
        self._coefs: list[float] = [1.0] * len(self.task_names)

    def order(self, i: int) -> list[int]:
        others = [j for j in range(len(self.task_names)) if j != i]
        return [others[p] for p in torch.randperm(len(others), generator=self.generator).tolist()]

    def coefficients(self, m: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
        """Coefficients c with sum_i adjusted g_i = c @ grads; updates the targets."""
        k = m.shape[0]
        names = self.task_names
        total = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            c = torch.zeros(k, dtype=torch.float64)
            c[i] = 1.0
            for j in orders[i]:
                nj = math.sqrt(max(float(m[j, j]), 0.0))
                ni = math.sqrt(max(float(c @ m @ c), 0.0))
                row = self.targets.setdefault(names[i], {})
                target = row.get(names[j], 0.0)
                if ni == 0 or nj == 0:  # no direction: nothing to align, nothing to learn
                    continue
                phi = float(c @ m[:, j]) / (ni * nj)
                phi = min(1.0, max(-1.0, phi))
                if phi < target < 1.0:  # a target of exactly 1 cannot be reached by a finite step
                    coef = ni * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)) / (
                        nj * math.sqrt(1 - target**2))
                    c[j] += coef
                row[names[j]] = (1 - self.beta) * target + self.beta * phi
            total += c
        return total

    def combine_grads(self, grads, losses):
        check_grads("gradvac", grads, self.task_names)
        orders = [self.order(i) for i in range(len(self.task_names))]
        coefs = self.coefficients(gram(grads), orders)
        self._coefs = coefs.tolist()
        return weighted_sum(coefs, grads)

    def weights(self):
        return dict(zip(self.task_names, self._coefs))

    def get_state(self):
        return {"rng": generator_state(self.generator),
                "targets": {i: dict(row) for i, row in self.targets.items()}}

    def set_state(self, state):
        if "rng" in state:
            set_generator_state(self.generator, state["rng"])
        self.targets = {str(i): {str(j): float(v) for j, v in row.items()}
                        for i, row in state.get("targets", {}).items()}


@hookimpl
def register_weightings(register):
    register(
        "gradvac",
        GradVac,
        params=GradVacParams,
        description="GradVac (Wang et al. 2021): raise pairwise gradient cosines to their moving-average targets",
    )
