"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

The model trains on sum_k w_k L_k. The task weights w (1 at the start) have their own
optimiser, on the loss

    L_grad = sum_k | G_k - mean_j(G_j) r_k^alpha |,   G_k = |grad_W (w_k L_k)| = w_k |grad_W L_k|,

with r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)) the relative inverse training rate
(L(0): the first step's losses) and the target mean_j(G_j) r_k^alpha held constant; its
gradient in w_k is sign(G_k - target_k) |grad_W L_k|. After each step the weights are
renormalised to sum to K. W is the last shared layer: the last shared weight tensor (2+
dimensions) in the model's parameter order, or with ``grad_target = "features"`` the shared
representation (the cheap variant, as LibMTL's rep_grad). alpha = 1.5 (the paper's NYUv2
value); the weights' optimiser is Adam with learning rate ``lr`` (0.025, as other methods'
own parameters in the Nash-MTL/FAMO code).

A task with no valid target in the batch (a zero gradient at W) takes no part in the step
(``ctx.present_tasks``): the model trains on the present tasks' weighted losses, r, the
mean of G and the Adam step (each task's step count counts the steps it took part in) are
taken over them, and they are renormalised to keep their share of K, so the left-out
task's weight, L(0) and moments stay as they were (at the start, the step is GradNorm's
on the other tasks alone); with no task left there is no backward pass and no step.

Under torchrun the per-task gradients of W and the losses are the global batch's (averaged
over ranks), so every rank moves the weights alike. w, L(0) and Adam's moments are
buffers (checkpointed with the weighting).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.engine import distributed as D
from mtlkit.contracts import Weighting
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import present_rows, task_index

from ._common import GradTargetParams, adam_step, require_tasks, step_counts, task_steps


class GradNormParams(GradTargetParams):
    alpha: float = Field(1.5, ge=0)  # asymmetry: how strongly slow tasks are pushed
    lr: float = Field(0.025, gt=0)  # Adam's learning rate for the task weights


def last_shared_weight(shared: list[torch.nn.Parameter]) -> torch.nn.Parameter:
    """The last shared parameter with two or more dimensions (a layer's weight)."""
    weights = [p for p in shared if p.dim() >= 2]
    if not weights:
        raise ValueError("weighting 'gradnorm': the model has no shared weight tensor (2+ dimensions)")
    return weights[-1]


class GradNorm(Weighting):
    requires_grads = "shared"
    grad_targets = ("params", "features")

    def __init__(self, params: GradNormParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("gradnorm", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        k = len(self.all_tasks)
        self.alpha, self.lr, self.grad_target = float(params.alpha), float(params.lr), params.grad_target
        self.register_buffer("task_weights", torch.ones(k))
        self.register_buffer("initial_losses", torch.zeros(k))  # L(0); 0: not seen yet
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.updates = [0] * k  # Adam steps each task's weight took

    def combine(self, losses):
        return sum(self.task_weights[k] * losses[t] for k, t in enumerate(self.all_tasks) if t in losses)

    def backward(self, ctx):
        missing = [t for t in self.all_tasks if t not in ctx.losses]
        if missing:
            raise ConfigError(f"weighting 'gradnorm': every task needs a loss each step, missing {missing} "
                              f"(many-to-many: training.domain_order = \"mixed\" over every domain)")
        w = self.task_weights
        if self.grad_target == "features":
            rows = ctx.task_gradients(private_weights={t: w[k] for k, t in enumerate(self.all_tasks)})
            present = ctx.present_tasks()
            idx = task_index(self.all_tasks, present, w.device)
            ctx.set_gradient(w[idx].to(rows) @ present_rows(rows, self.all_tasks, present) if present else None)
        else:
            layer = last_shared_weight(ctx.shared_params)
            rows = torch.stack([torch.autograd.grad(ctx.losses[t], layer, retain_graph=True,
                                                    allow_unused=True)[0].reshape(-1)
                                if ctx.losses[t].requires_grad else torch.zeros(layer.numel(), device=layer.device)
                                for t in self.all_tasks])
            D.all_reduce_mean_(rows, ctx.dist)
            present = ctx.present_tasks()
            if present:  # none: no gradient at all, the optimiser leaves the trunk alone
                ctx.backward_loss(self.combine({t: ctx.losses[t] for t in present}))
        if not present:
            return
        losses = ctx.global_losses()
        rows = present_rows(rows, self.all_tasks, present)
        self.update(torch.linalg.vector_norm(rows, dim=1).to(w),
                    torch.stack([losses[t].to(w) for t in present]), present)

    def update(self, norms: torch.Tensor, losses: torch.Tensor, names: list[str] | None = None) -> None:
        """One step of the weights of the tasks ``names`` (every task by default) from their
        unweighted gradient norms |grad_W L_k| and losses (in that order)."""
        names = self.all_tasks if names is None else names
        rows = [self.all_tasks.index(t) for t in names]
        idx = task_index(self.all_tasks, names, self.task_weights.device)
        w = self.task_weights
        # their share of K: the left-out tasks' weights stay as they are
        share = len(self.all_tasks) - (w.sum() - w[idx].sum()) if len(rows) < len(self.all_tasks) \
            else float(len(self.all_tasks))
        # L(0): each task's first loss (no read-back: where, not if)
        init = self.initial_losses[idx]
        init = torch.where(init > 0, init, losses)
        self.initial_losses[idx] = init
        ratio = losses / init.clamp_min(1e-12)
        r = ratio / ratio.mean()
        g = w[idx] * norms
        target = g.mean() * r ** self.alpha  # a constant of L_grad
        grad = torch.sign(g - target) * norms
        adam_step(w, grad, self.adam_m, self.adam_v, task_steps(self.updates, rows), self.lr, rows=rows)
        mine = w[idx].clamp(min=1e-8)
        w[idx] = mine * (share / mine.sum())

    def weights(self):
        # over task_names: the present tasks after a step that left some out; 0-dim device
        # tensors of a copy (the next step updates task_weights in place)
        w = dict(zip(self.all_tasks, self.task_weights.detach().clone().unbind()))
        return {t: w[t] for t in self.task_names}

    def get_state(self):
        return {"updates": list(self.updates)}

    def set_state(self, state):
        self.updates = step_counts("gradnorm", state.get("updates", 0), len(self.all_tasks))


@hookimpl
def register_weightings(register):
    register(
        "gradnorm",
        GradNorm,
        params=GradNormParams,
        description="GradNorm (Chen et al. 2018): weights learned so task gradient norms follow training rates",
    )
