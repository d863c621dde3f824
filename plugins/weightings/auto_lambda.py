"""Auto-Lambda (Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022).

Task weights lambda (0.1 each at the start) are learned on a meta-objective: the
validation loss after one virtual training step. Each step, before the model's update:

  1. virtual step: theta' = theta - a (m + g + wd theta), g = grad_theta sum_k lambda_k L_k on
     the training batch, a the optimiser's current learning rate, wd its weight decay, m
     SGD's momentum buffer times the momentum (0 for other optimisers);
  2. d = grad_theta' of the primary tasks' loss on a validation batch (``ctx.draw_batch``);
  3. the hypergradient of that loss in lambda, -a grad^2_{lambda,theta} L_train . d, by central
     differences: -a (L_k(theta + e d) - L_k(theta - e d)) / (2 e), e = 0.01 / |d|;
  4. one Adam step on lambda (learning rate ``lr``, 1e-4 as in the authors' dense-prediction
     experiments), then the model trains on sum_k lambda_k L_k.

Primary tasks: all tasks by default (multi-task learning), or the ``primary`` list
(auxiliary learning). The virtual step swaps the parameters' data and swaps it back, so the
step's own forward graph stays valid. Under torchrun g, d and the finite-difference losses
are averaged over ranks (every rank draws its own validation samples), so every rank moves
lambda alike. lambda and Adam's moments are buffers (checkpointed with the weighting).

A task with no valid target in the training batch (a zero loss) takes no part in the step
(``ctx.present_tasks``): the training loss and the virtual step sum over the present
tasks, only their lambdas take the Adam step (each task's step count counts the steps it
took part in), so the left-out task's lambda and moments stay as they were; with no task
left there is no meta step and no backward pass. The validation objective is the primary
tasks' loss on the validation batch, whatever the training batch holds.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.engine import distributed as D
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

from ._common import adam_step, step_counts, task_steps


class AutoLambdaParams(Params):
    init: float = Field(0.1, gt=0)  # lambda at the start
    lr: float = Field(1e-4, gt=0)  # Adam's learning rate for lambda
    primary: list[str] | None = None  # tasks of the validation objective (None: all)
    split: Literal["val", "train"] = "val"  # where the meta batch is drawn from


def _flat(grads, params, dist):
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return D.all_reduce_mean_(flat, dist)


def _assign(params, flat, base=None, scale=1.0):
    """Each parameter's data := base + scale * its slice of ``flat`` (base: its own data)."""
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        start = p.data if base is None else base[i]
        p.data = start + scale * flat[offset:offset + n].view_as(p)
        offset += n


class AutoLambda(Weighting):
    def __init__(self, params: AutoLambdaParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        k = len(self.task_names)
        unknown = [t for t in params.primary or [] if t not in self.task_names]
        if unknown:
            raise ConfigError(f"weighting 'auto_lambda': primary names unknown tasks {unknown} "
                              f"(tasks: {', '.join(self.task_names)})")
        self.all_tasks = list(self.task_names)
        self.primary = list(params.primary) if params.primary else list(self.task_names)
        self.lr, self.split = float(params.lr), params.split
        self.register_buffer("lambdas", torch.full((k,), float(params.init)))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.updates = [0] * k  # Adam steps each task's lambda took

    def combine(self, losses):
        terms = [self.lambdas[k] * losses[t] for k, t in enumerate(self.all_tasks) if t in losses]
        if not terms:
            raise ValueError("weighting 'auto_lambda': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def backward(self, ctx):
        present = ctx.present_tasks()
        if not present:  # no task to learn from: no gradient, no meta step
            return
        grad = self.meta_gradient(ctx, present)
        if grad is not None:
            rows = [self.all_tasks.index(t) for t in present]
            adam_step(self.lambdas, grad.to(self.lambdas), self.adam_m, self.adam_v,
                      task_steps(self.updates, rows), self.lr, rows=rows)
        ctx.backward_loss(self.combine({t: ctx.losses[t] for t in present}))

    def meta_gradient(self, ctx, present: list[str] | None = None) -> torch.Tensor | None:
        """d L_val(theta') / d lambda_k for the tasks ``present`` (every task with a loss by
        default), by the authors' finite differences (None: d = 0)."""
        params = [p for p in ctx.raw_model.parameters() if p.requires_grad]
        group = ctx.optimizer.param_groups[0]
        a, wd = float(group["lr"]), float(group.get("weight_decay", 0.0) or 0.0)
        if present is None:
            present = [t for t in self.all_tasks if t in ctx.losses]
        terms = [self.lambdas[self.all_tasks.index(t)] * ctx.losses[t] for t in present if ctx.losses[t].requires_grad]
        grads = torch.autograd.grad(sum(terms[1:], terms[0]), params, retain_graph=True, allow_unused=True) \
            if terms else [None] * len(params)
        g = _flat(grads, params, ctx.dist)
        original = [p.data for p in params]
        try:
            with torch.no_grad():  # theta' = theta - a (m + g + wd theta)
                step = g.clone()
                offset = 0
                for p in params:
                    n = p.numel()
                    buf = ctx.optimizer.state.get(p, {}).get("momentum_buffer") if "momentum" in group else None
                    extra = wd * p.data
                    if buf is not None:
                        extra = extra + group["momentum"] * buf
                    step[offset:offset + n] += extra.reshape(-1)
                    offset += n
                _assign(params, step, original, -a)
            val = ctx.losses_on(ctx.draw_batch(self.split))
            terms = [val[t] for t in self.primary if t in val]
            if not terms:  # many-to-many: this step's domain is not a primary task
                return None
            objective = sum(terms[1:], terms[0])
            d = _flat(torch.autograd.grad(objective, params, allow_unused=True), params, ctx.dist)
            norm = float(torch.linalg.vector_norm(d))
            if not norm > 0:
                return None
            e = 0.01 / norm
            sides = []
            with torch.no_grad():
                for sign in (1.0, -1.0):  # theta +- e d
                    _assign(params, d, original, sign * e)
                    out = ctx.losses_on(ctx.batch)
                    vals = torch.stack([out[t].detach().float() for t in present])
                    sides.append(D.all_reduce_mean_(vals, ctx.dist))
        finally:
            for p, data in zip(params, original):
                p.data = data
        return -a * (sides[0] - sides[1]) / (2 * e)

    def weights(self):
        # over task_names: the present tasks after a step that left some out
        lam = dict(zip(self.all_tasks, self.lambdas.tolist()))
        return {t: lam[t] for t in self.task_names}

    def get_state(self):
        return {"updates": list(self.updates)}

    def set_state(self, state):
        self.updates = step_counts("auto_lambda", state.get("updates", 0), len(self.all_tasks))


@hookimpl
def register_weightings(register):
    register(
        "auto_lambda",
        AutoLambda,
        params=AutoLambdaParams,
        description="Auto-Lambda (Liu et al. 2022): task weights learned on the validation loss after a virtual step",
    )
