"""Auto-Lambda (Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022).

Task weights lambda (0.1 each at the start) are learned on a meta-objective: the
validation loss after one virtual training step. Each step, before the model's update:

  1. virtual step: theta' = theta - a (m + g + wd theta), g = grad_theta sum_k lambda_k L_k on
     the training batch, a the optimiser's current learning rate, wd its weight decay, m
     SGD's momentum buffer times the momentum (0 for other optimisers);
  2. d = grad_theta' of the primary tasks' loss on a meta batch (``ctx.draw_batch``): by
     default another draw from the training data, as in the authors' dense-prediction code
     (``split = "val"`` draws from the evaluation split instead);
  3. the hypergradient of that loss in lambda, -a grad^2_{lambda,theta} L_train . d, by central
     differences: -a (L_k(theta + e d) - L_k(theta - e d)) / (2 e), e = 0.01 / |d|;
  4. one Adam step on lambda (learning rate ``lr``, 1e-4 as in the authors' dense-prediction
     experiments), then the model trains on sum_k lambda_k L_k.

Primary tasks: all tasks by default (multi-task learning), or the ``primary`` list
(auxiliary learning). The virtual step swaps the parameters' data and swaps it back, so the
step's own forward graph stays valid. Under torchrun g, d and the finite-difference losses
are averaged over ranks (every rank draws its own validation samples), so every rank moves
lambda alike. lambda and Adam's moments are buffers (checkpointed with the weighting).

Nothing is read back from the device during the step: where d = 0 (no primary target in
the validation batch) or is not finite, e is undefined and lambda takes no step; that is
decided on the device (the two finite-difference passes then run at theta itself and the
Adam step is masked out), so the per-task Adam step counts stay on the device too (a
buffer outside the state dict; the JSON state carries them).

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
from mtlkit.step_context import to_device

from ._common import adam_step, step_counts


class AutoLambdaParams(Params):
    init: float = Field(0.1, gt=0)  # lambda at the start
    lr: float = Field(1e-4, gt=0)  # Adam's learning rate for lambda
    primary: list[str] | None = None  # tasks of the validation objective (None: all)
    # where the meta batch is drawn from. "train" (the authors' dense-prediction code: a copy of
    # the training loader in another order): the trainer's val split is the split it evaluates
    # on (NYUv2's is the test set), so "val" learns the weights on the data they are scored on
    split: Literal["train", "val"] = "train"


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
        # Adam steps each task's lambda took: counted on the device (a step with d = 0 takes
        # none, known only there); not in the state dict, get_state carries it (old format)
        self.register_buffer("updates", torch.zeros(k, dtype=torch.long), persistent=False)

    def combine(self, losses):
        terms = [self.lambdas[k] * losses[t] for k, t in enumerate(self.all_tasks) if t in losses]
        if not terms:
            raise ValueError("weighting 'auto_lambda': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def backward(self, ctx):
        present = ctx.present_tasks()
        if not present:  # no task to learn from: no gradient, no meta step
            return
        meta = self._hypergradient(ctx, present)
        if meta is not None:
            self._adam_step(*meta, [self.all_tasks.index(t) for t in present])
        ctx.backward_loss(self.combine({t: ctx.losses[t] for t in present}))

    def _adam_step(self, grad: torch.Tensor, ok: torch.Tensor, rows: list[int]) -> None:
        """One Adam step of the lambdas ``rows`` where ``ok`` (a device bool), none elsewhere."""
        index = to_device(rows, self.lambdas.device, torch.long)
        lam, m, v = self.lambdas[index], self.adam_m[index], self.adam_v[index]  # copies
        adam_step(lam, grad.to(lam), m, v, self.updates[index] + 1, self.lr)
        self.lambdas[index] = torch.where(ok, lam, self.lambdas[index])
        self.adam_m[index] = torch.where(ok, m, self.adam_m[index])
        self.adam_v[index] = torch.where(ok, v, self.adam_v[index])
        self.updates[index] += ok.long()

    def meta_gradient(self, ctx, present: list[str] | None = None) -> torch.Tensor | None:
        """d L_val(theta') / d lambda_k for the tasks ``present`` (every task with a loss by
        default), by the authors' finite differences (None: this step's domain is not a
        primary task; NaN: d = 0 or not finite, no direction to differentiate along)."""
        meta = self._hypergradient(ctx, present)
        return None if meta is None else torch.where(meta[1], meta[0], float("nan"))

    def _hypergradient(self, ctx, present: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the hypergradient, whether it is defined: a device bool, d > 0 and finite), or None."""
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
            norm = torch.linalg.vector_norm(d)
            ok = norm > 0  # False for d = 0 or NaN (an inf norm gives e = 0: no step either)
            # no read to skip the passes: with ok False they run at theta (d := 0), and the
            # step is masked out; e in float64, as the Python float it replaces
            e = 0.01 / torch.where(ok, norm, 1.0).double()
            ok = ok & (e > 0)
            d = torch.where(ok, d, 0.0)
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
        return -a * (sides[0] - sides[1]) / (2 * e), ok

    def weights(self):
        # over task_names: the present tasks after a step that left some out; 0-dim device
        # tensors of a copy (the next step updates lambdas in place)
        lam = dict(zip(self.all_tasks, self.lambdas.detach().clone().unbind()))
        return {t: lam[t] for t in self.task_names}

    def get_state(self):
        return {"updates": [int(n) for n in self.updates.tolist()]}  # at checkpoint time, not per step

    def set_state(self, state):
        counts = step_counts("auto_lambda", state.get("updates", 0), len(self.all_tasks))
        self.updates.copy_(torch.tensor(counts, dtype=torch.long))


@hookimpl
def register_weightings(register):
    register(
        "auto_lambda",
        AutoLambda,
        params=AutoLambdaParams,
        description="Auto-Lambda (Liu et al. 2022): task weights learned on a meta batch's loss after a virtual step",
    )
