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
adjustment runs on K coefficients against the Gram matrix, on its device (every branch a
mask: the step reads nothing back). The targets and the generator of the visiting order
are checkpoint state; the order's seed is the same on every rank.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import task_index, to_device

from ._common import GradTargetParams, check_grads, generator_state, gram, require_tasks, set_generator_state, weighted_sum


class GradVacParams(GradTargetParams):
    beta: float = Field(0.01, gt=0, le=1)  # EMA rate of the target cosines
    seed: int = Field(0, ge=0)  # seeds the visiting order (same on every DDP rank)


class GradVac(Weighting):
    requires_grads = "shared"
    grad_targets = ("params", "features")

    def __init__(self, params: GradVacParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.grad_target = params.grad_target
        require_tasks("gradvac", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        self.beta = float(params.beta)
        self.generator = torch.Generator().manual_seed(int(params.seed))
        # EMA target cosine of each ordered task pair (row i, column j; all tasks, 0 until
        # visited): float64, on the Gram's device; get_state writes it out by name
        k = len(self.all_tasks)
        self.phi = torch.zeros(k, k, dtype=torch.float64)
        # the last step's coefficients: a device tensor, read with the losses once per log interval
        self._coefs: torch.Tensor | list[float] = [1.0] * k

    def order(self, i: int) -> torch.Tensor:
        """The order in which task i visits the others (draws from the generator): a CPU
        tensor of task indices, never read as Python values."""
        k = len(self.task_names)
        others = torch.tensor([j for j in range(k) if j != i], dtype=torch.long)
        return others[torch.randperm(k - 1, generator=self.generator)]

    @property
    def targets(self) -> dict[str, dict[str, float]]:
        """The target cosines by task names, targets[i][j] (reads them: not for the step)."""
        rows = self.phi.tolist()
        return {a: {b: rows[i][j] for j, b in enumerate(self.all_tasks) if j != i}
                for i, a in enumerate(self.all_tasks)}

    def coefficients(self, m: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Coefficients c with sum_i adjusted g_i = c @ grads; updates the targets.

        The tasks adjust side by side (each against the original g_j, with its own
        targets): K x K coefficients, one visit of every task per round, every condition
        a mask, so that nothing is read back from the device."""
        k, dev = m.shape[0], m.device
        if self.phi.device != dev:
            self.phi = self.phi.to(dev)
        index = task_index(self.all_tasks, self.task_names, dev)
        orders = to_device(orders, dev, torch.long)
        phi = self.phi.view(-1)  # row-major: entry (a, b) of the full K x K targets at a * K + b
        diag = torch.diagonal(m)
        c = torch.eye(k, dtype=torch.float64, device=dev)  # row i: the running g_i
        for s in range(orders.shape[1]):
            j = orders[:, s:s + 1]  # K x 1: the task each g_i meets in round s
            cm = c @ m
            nj = diag[j].clamp(min=0.0).sqrt()
            ni = (cm * c).sum(1, keepdim=True).clamp(min=0.0).sqrt()
            pair = index[:, None] * len(self.all_tasks) + index[j]
            target = phi[pair]
            live = (ni != 0) & (nj != 0)  # no direction: nothing to align, nothing to learn
            cos = (cm.gather(1, j) / torch.where(live, ni * nj, 1.0)).clamp(-1.0, 1.0)
            # a target of exactly 1 cannot be reached by a finite step
            raise_ = live & (cos < target) & (target < 1.0)
            root = torch.where(raise_, 1 - target * target, 1.0).sqrt()
            coef = ni * (target * (1 - cos * cos).sqrt() - cos * root) / (nj * root)
            c.scatter_add_(1, j, torch.where(raise_, coef, 0.0))
            phi.scatter_(0, pair.reshape(-1), torch.where(live, (1 - self.beta) * target + self.beta * cos,
                                                          target).reshape(-1))
        return c.sum(0)

    def combine_grads(self, grads, losses):
        check_grads("gradvac", grads, self.task_names)
        k = len(self.task_names)
        orders = torch.stack([torch.as_tensor(self.order(i), dtype=torch.long).reshape(k - 1) for i in range(k)])
        coefs = self.coefficients(gram(grads, host=False), orders)
        self._coefs = coefs
        return weighted_sum(coefs, grads)

    def weights(self):
        return dict(zip(self.task_names, self._coefs))

    def get_state(self):
        return {"rng": generator_state(self.generator), "targets": self.targets}

    def set_state(self, state):
        set_generator_state(self.generator, state)
        # by names (older checkpoints: only the pairs visited so far; the others start at 0)
        pos = {t: n for n, t in enumerate(self.all_tasks)}
        rows = [[0.0] * len(self.all_tasks) for _ in self.all_tasks]
        for a, row in state.get("targets", {}).items():
            for b, v in row.items():
                if str(a) in pos and str(b) in pos:
                    rows[pos[str(a)]][pos[str(b)]] = float(v)
        self.phi = torch.tensor(rows, dtype=torch.float64, device=self.phi.device)


@hookimpl
def register_weightings(register):
    register(
        "gradvac",
        GradVac,
        params=GradVacParams,
        description="GradVac (Wang et al. 2021): raise pairwise gradient cosines to their moving-average targets",
    )
