"""GradDrop: gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai &
Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020).

Works on the shared representation A (``grad_target = "features"`` only). With
grad_i = dL_i/dA per task and the batch-summed signed gradients S_i = sum_batch sign(A) grad_i,
each element of A (batch dimension excluded) gets a positive-sign purity

    P = 1/2 (1 + sum_i S_i / sum_i |S_i|),

a uniform draw U, and keeps, for every task, the gradient components of one sign only:
M_i = [P > U] [grad_i > 0] + [P < U] [grad_i < 0]. A's gradient is
sum_i (leak + (1 - leak) M_i) grad_i, back-propagated once through the trunk; task-specific
parameters get their plain loss gradients. leak = 0 (the paper's default).

A task with no valid target in the batch (a zero loss) is left out by the engine, as for
every gradient-level method; with one task left there is no other task's sign to pick
against, and its gradient passes unmasked (GradDrop needs two tasks: on one, the batch-summed
purity would still drop the per-sample components that disagree with the batch's sign,
which is not what the method is for). ``weights()``: 1 for each task in the sum (the masks
act per element, not per task), 0 for a left-out task.

Under torchrun the purity is the global batch's (each rank's S over its samples, summed),
the draws U come from a generator seeded alike on every rank (its state is checkpointed),
and every rank applies the same masks to the gathered rows.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.engine import distributed as D
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params
from mtlkit.step_context import to_device

from ._common import generator_state, require_tasks, set_generator_state


class GradDropParams(Params):
    leak: float = Field(0.0, ge=0, le=1)  # the share of every gradient that always passes
    seed: int = Field(0, ge=0)  # seeds the draws U (same on every DDP rank)


def sign_dropout(grads: torch.Tensor, signs: torch.Tensor, batch_sizes: list[int], sizes: list[int],
                 uniform: torch.Tensor, leak: float, world: int = 1, rank: int = 0,
                 reduce=lambda s: s) -> torch.Tensor:
    """GradDrop's combined gradient of the representation.

    ``grads``: K x (world * N) task gradients (rank blocks side by side, each block the
    concatenation of the flattened representation tensors, batch first); ``signs``: sign(A)
    of this rank's block (N); ``batch_sizes``/``sizes``: each tensor's batch size and numel
    on one rank; ``uniform``: U, one draw per element without batch (sum of numel / batch);
    ``reduce``: sums the K x E signed sums over ranks.
    """
    k = grads.shape[0]
    total = sum(sizes)
    blocks = grads.view(k, world, total)
    mine = blocks[:, rank] * signs
    parts, offset = [], 0
    for b, n in zip(batch_sizes, sizes):
        parts.append(mine[:, offset:offset + n].reshape(k, b, n // b).sum(1))
        offset += n
    signed = reduce(torch.cat(parts, 1))  # K x E
    purity = 0.5 * (1 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))
    u = to_device(uniform, purity.device, purity.dtype)  # .to() from pageable memory would block
    pos, neg = [], []
    offset = 0
    for b, n in zip(batch_sizes, sizes):
        e = n // b
        pos.append((purity[offset:offset + e] > u[offset:offset + e]).repeat(b))
        neg.append((purity[offset:offset + e] < u[offset:offset + e]).repeat(b))
        offset += e
    keep_pos, keep_neg = torch.cat(pos), torch.cat(neg)  # one block's elements
    mask = (blocks > 0) & keep_pos | (blocks < 0) & keep_neg
    return ((leak + (1 - leak) * mask.to(grads)) * blocks).sum(0).reshape(-1)


class GradDrop(Weighting):
    requires_grads = "shared"
    grad_targets = ("features",)
    grad_target = "features"

    def __init__(self, params: GradDropParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("graddrop", self.task_names, 2)
        self.leak = float(params.leak)
        self.generator = torch.Generator().manual_seed(int(params.seed))

    def backward(self, ctx):
        reps = ctx.representation
        if reps is None:
            raise ValueError("weighting 'graddrop': the step has no shared representation")
        world, rank = (ctx.dist.world_size, ctx.dist.rank) if ctx.dist.enabled else (1, 0)
        batch_sizes = [r.shape[0] for r in reps]
        sizes = [r.numel() for r in reps]
        signs = torch.cat([r.detach().sign().reshape(-1) for r in reps])
        elements = sum(n // b for b, n in zip(batch_sizes, sizes))

        def combine(grads, losses):
            if grads.shape[0] == 1:  # one task left (the others had no target): nothing to pick against
                return grads[0]
            uniform = torch.rand(elements, generator=self.generator, dtype=torch.float64)
            return sign_dropout(grads, signs.to(grads), batch_sizes, sizes, uniform, self.leak, world, rank,
                                reduce=lambda s: D.all_reduce_sum(s, ctx.dist))

        ctx.backward_gradients(combine)

    def weights(self):
        return {t: 1.0 for t in self.task_names}

    def get_state(self):
        return {"rng": generator_state(self.generator)}

    def set_state(self, state):
        set_generator_state(self.generator, state)


@hookimpl
def register_weightings(register):
    register(
        "graddrop",
        GradDrop,
        params=GradDropParams,
        description="GradDrop (Chen et al. 2020): per-element sign dropout of the representation's task gradients",
    )
