"""ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning
with Excess Risks", ICML 2024).

Tasks are weighted by their estimated excess risk (distance to their own optimum) rather
than their loss, so that noisy tasks with a high irreducible loss do not take over. With a
diagonal, AdaGrad-like curvature estimate H_k = diag(sqrt(S_k + 1e-7)), S_k the running
sum of g_k squared elementwise, the excess risk is estimated as e_k = g_k^T H_k^-1 g_k.
The first step's estimates are the reference e_k^0; from the second on, the weights move
by an exponentiated-gradient (mirror ascent) step and are normalised to sum to K:

    w_k <- w_k exp(eta e_k / e_k^0),   w <- K w / sum(w),

and the step's update is sum_k w_k g_k. w = 1 at the start; eta = 1e-2, the authors'
``robust_step_size``. Task-specific parameters get the gradient of sum_k w_k L_k with the
step's new weights, as in the authors' code: the weighting owns its backward, keeps the
graph through the per-task passes and takes one more pass through the task branches
only (the default step would fix their coefficients before the weights move).

S (K x P) is a buffer of the weighting, checkpointed with it, like w and e^0. A task with
no valid target in the batch (a zero loss, ``ctx.present_tasks``) takes no part in the
step: it keeps its S, e^0 and weight; the present tasks' weights take the step and are
renormalised to keep their share of K (at the start, the step is ExcessMTL's on the other
tasks alone). With no task left the shared parameters get no gradient. Only ``params`` gradients: S
accumulates over steps, which per-sample representation gradients do not.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import present_rows, task_index
from mtlkit.registry import Params

from ._common import check_grads, require_tasks, sized_buffer


class ExcessMTLParams(Params):
    step_size: float = Field(1e-2, gt=0)  # eta of the exponentiated-gradient step on the weights


class ExcessMTL(Weighting):
    requires_grads = "shared"

    def __init__(self, params: ExcessMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("excess_mtl", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        k = len(self.all_tasks)
        self.step_size = float(params.step_size)
        self.register_buffer("grad_sq_sum", torch.zeros(k, 0))
        self.register_buffer("loss_weight", torch.ones(k))
        self.register_buffer("initial_risk", torch.zeros(k))  # e^0; 0: not seen yet

    def backward(self, ctx):
        grads = ctx.task_gradients(retain_graph=True)
        present = ctx.present_tasks()
        ctx.set_gradient(self.update(present_rows(grads, ctx.task_names, present), present) if present else None)
        # the task branches: this step's weights, one pass that stops at the representation
        terms = [self.loss_weight[self.all_tasks.index(t)] * ctx.losses[t]
                 for t in present if ctx.losses[t].requires_grad]
        private = list(ctx.private_params)
        if terms and private:
            for p, g in zip(private, torch.autograd.grad(sum(terms[1:], terms[0]), private, allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

    def combine_grads(self, grads, losses):
        check_grads("excess_mtl", grads, self.task_names)
        return self.update(grads, self.task_names)

    def update(self, grads, names):
        """One step of the risk estimates and the weights (rows of ``grads``: the tasks
        ``names``); the update sum_k w_k g_k over them."""
        s = sized_buffer(self, "grad_sq_sum", len(self.all_tasks), grads)
        k = len(self.all_tasks)
        rows = task_index(self.all_tasks, names, s.device)
        s[rows] += grads * grads
        risk = (grads * grads / torch.sqrt(s[rows] + 1e-7)).sum(1).to(self.loss_weight)
        init = self.initial_risk[rows]
        seen = init > 0
        # a task's first step sets its reference; later steps move its weight (on the device)
        exponent = torch.where(seen, self.step_size * risk / torch.where(seen, init, 1.0), 0.0)
        self.initial_risk[rows] = torch.where(seen, init, risk)
        w = self.loss_weight
        # their share of K: the left-out tasks' weights stay as they are
        share = k - (w.sum() - w[rows].sum()) if len(names) < k else float(k)
        mine = w[rows] * torch.exp(exponent)
        w[rows] = mine * share / mine.sum()
        return w[rows].to(grads) @ grads

    def combine(self, losses):
        terms = [self.loss_weight[k] * losses[t] for k, t in enumerate(self.all_tasks) if t in losses]
        if not terms:
            raise ValueError("weighting 'excess_mtl': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def weights(self):
        # over task_names: the present tasks after a step that left some out; 0-dim device
        # tensors of a copy (the next step updates loss_weight in place)
        w = dict(zip(self.all_tasks, self.loss_weight.detach().clone().unbind()))
        return {t: w[t] for t in self.task_names}


@hookimpl
def register_weightings(register):
    register(
        "excess_mtl",
        ExcessMTL,
        params=ExcessMTLParams,
        description="ExcessMTL (He et al. 2024): weights by estimated excess risk, exponentiated-gradient steps",
    )
