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

from ._common import adam_step, require_tasks


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
        k = len(self.task_names)
        self.w_lr, self.gamma, self.eps = float(params.w_lr), float(params.gamma), float(params.eps)
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.updates = 0  # Adam steps taken
        self._before: torch.Tensor | None = None

    def loss_weights(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """z_k / (c (L_k + eps)), the factor of each task's loss gradient (tasks in order)."""
        z = torch.softmax(self.logits, 0)
        d = torch.stack([losses[t].detach().to(z) for t in self.task_names]) + self.eps
        c = (z / d).sum()
        return z / (c * d)

    def combine(self, losses):
        w = self.loss_weights(losses)
        return sum(w[k].to(losses[t].dtype) * losses[t] for k, t in enumerate(self.task_names))

    def backward(self, ctx):
        missing = [t for t in self.task_names if t not in ctx.losses]
        if missing:
            raise ConfigError(f"weighting 'famo': every task needs a loss each step, missing {missing} "
                              f"(many-to-many: training.domain_order = \"mixed\" over every domain)")
        losses = ctx.global_losses()  # the weights of the global batch, on every rank
        self._before = torch.stack([losses[t].to(self.logits) for t in self.task_names])
        w = self.loss_weights(losses)
        ctx.backward_loss(sum(w[k].to(ctx.losses[t].dtype) * ctx.losses[t] for k, t in enumerate(self.task_names)))

    def on_step_end(self, ctx):
        with torch.no_grad():
            new = ctx.losses_on(ctx.batch)
            after = torch.stack([new[t].detach().to(self.logits) for t in self.task_names])
            D.all_reduce_mean_(after, ctx.dist)
            self.update(self._before, after)

    def update(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """One Adam step of the logits from the losses before and after the model's update."""
        self.updates += 1
        grad = famo_logit_gradient(self.logits, before, after, self.eps)
        adam_step(self.logits, grad, self.adam_m, self.adam_v, self.updates, self.w_lr, weight_decay=self.gamma)

    def weights(self):
        return dict(zip(self.task_names, torch.softmax(self.logits, 0).tolist()))

    def get_state(self):
        return {"updates": self.updates}

    def set_state(self, state):
        self.updates = int(state.get("updates", 0))


@hookimpl
def register_weightings(register):
    register(
        "famo",
        FAMO,
        params=FAMOParams,
        description="FAMO (Liu et al. 2023): O(1) weights from the change of log losses after each update",
    )
