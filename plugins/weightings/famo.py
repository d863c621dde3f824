"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive
Multitask Optimization", NeurIPS 2023).

O(1) per step: no per-task gradients. Task weights z = softmax(xi) (logits xi, 0 at the
start). The step minimises sum_k z_k log(L_k - m_k + 1e-8) / c with c = sum_k z_k / (L_k -
m_k + 1e-8) held fixed (m_k = 0, the losses' lower bound), i.e. task k's gradient gets the
weight z_k / (c (L_k + 1e-8)). After the optimiser step the losses are evaluated again on
the same batch (``on_step_end``), and the logits take one Adam step (learning rate
``w_lr``, L2 decay ``gamma``) along the gradient

    d = J_softmax(xi)^T delta,   delta_k = log(L_k + 1e-8) - log(L_k' + 1e-8)

(L before, L' after the update): the logits move so that the task whose log loss fell
least gains weight. w_lr = 0.025 and gamma = 0.01 are the authors' code's defaults
(LibMTL uses gamma = 1e-3).

A task with no valid target in the batch (a zero loss) takes no part in the step
(``ctx.present_tasks``): the weights are the softmax of the present tasks' logits, c sums
over them, and only their logits take the Adam step (each task's Adam step count counts
the steps it took part in), so no log of a zero loss is taken, the left-out task's logit
and moments stay as they were, and the step is FAMO's on the other tasks alone; with no
task left there is no backward pass and no logit step.

Under torchrun every value that decides the weights is the global batch's (the losses
before and after, averaged over ranks), so every rank moves its logits alike. The logits
and Adam's moments are buffers of the weighting (checkpointed with it).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.engine import distributed as D
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params
from mtlkit.step_context import task_index

from ._common import adam_step, require_tasks, step_counts, task_steps


class FAMOParams(Params):
    w_lr: float = Field(0.025, gt=0)  # Adam's learning rate for the logits
    gamma: float = Field(0.01, ge=0)  # L2 decay of the logits
    eps: float = Field(1e-8, gt=0)  # added to the losses inside the logs


def famo_logit_gradient(logits: torch.Tensor, before: torch.Tensor, after: torch.Tensor, eps: float) -> torch.Tensor:
    """J_softmax(logits)^T (log(before + eps) - log(after + eps))."""
    z = torch.softmax(logits, 0)
    delta = torch.log(before + eps) - torch.log(after + eps)
    return z * (delta - (z * delta).sum())


class FAMO(Weighting):
    def __init__(self, params: FAMOParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("famo", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        k = len(self.all_tasks)
        self.w_lr, self.gamma, self.eps = float(params.w_lr), float(params.gamma), float(params.eps)
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.updates = [0] * k  # Adam steps each task's logit took
        self._before: torch.Tensor | None = None
        self._present: list[str] = []

    def _rows(self, names: list[str]) -> list[int]:
        return [self.all_tasks.index(t) for t in names]

    def _index(self, names: list[str]) -> torch.Tensor:
        return task_index(self.all_tasks, names, self.logits.device)

    def loss_weights(self, losses: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
        """z_k / (c (L_k + eps)), the factor of each task's loss gradient (the tasks ``names``,
        every task by default, in order; z the softmax of their logits)."""
        names = self.all_tasks if names is None else names
        z = torch.softmax(self.logits[self._index(names)], 0)
        d = torch.stack([losses[t].detach().to(z) for t in names]) + self.eps
        c = (z / d).sum()
        return z / (c * d)

    def combine(self, losses):
        names = [t for t in self.all_tasks if t in losses]
        w = self.loss_weights(losses, names)
        return sum(w[k].to(losses[t].dtype) * losses[t] for k, t in enumerate(names))

    def backward(self, ctx):
        missing = [t for t in self.all_tasks if t not in ctx.losses]
        if missing:
            raise ConfigError(f"weighting 'famo': every task needs a loss each step, missing {missing} "
                              f"(many-to-many: training.domain_order = \"mixed\" over every domain)")
        losses = ctx.global_losses()  # the weights of the global batch, on every rank
        present = self._present = ctx.present_tasks(losses=losses)
        if not present:  # no task to learn from: no gradient, no logit step
            return
        self._before = torch.stack([losses[t].to(self.logits) for t in present])
        w = self.loss_weights(losses, present)
        ctx.backward_loss(sum(w[k].to(ctx.losses[t].dtype) * ctx.losses[t] for k, t in enumerate(present)))

    def on_step_end(self, ctx):
        if not self._present:
            return
        with torch.no_grad():
            new = ctx.losses_on(ctx.batch)
            after = torch.stack([new[t].detach().to(self.logits) for t in self._present])
            D.all_reduce_mean_(after, ctx.dist)
            self.update(self._before, after, self._present)

    def update(self, before: torch.Tensor, after: torch.Tensor, names: list[str] | None = None) -> None:
        """One Adam step of the logits of the tasks ``names`` (every task by default) from
        their losses before and after the model's update (in that order)."""
        names = self.all_tasks if names is None else names
        rows = self._rows(names)
        grad = famo_logit_gradient(self.logits[self._index(names)], before, after, self.eps)
        adam_step(self.logits, grad, self.adam_m, self.adam_v, task_steps(self.updates, rows), self.w_lr,
                  weight_decay=self.gamma, rows=rows)

    def weights(self):
        # the weights z of the tasks in task_names (the present ones after a step that left some
        # out), as 0-dim device tensors (a new tensor: the logits' later steps do not change it)
        return dict(zip(self.task_names, torch.softmax(self.logits[self._index(self.task_names)], 0).unbind()))

    def get_state(self):
        return {"updates": list(self.updates)}

    def set_state(self, state):
        self.updates = step_counts("famo", state.get("updates", 0), len(self.all_tasks))


@hookimpl
def register_weightings(register):
    register(
        "famo",
        FAMO,
        params=FAMOParams,
        description="FAMO (Liu et al. 2023): O(1) weights from the change of log losses after each update",
    )
