"""DB-MTL: dual-balancing multi-task learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu &
Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023).

Loss-scale balancing: every task is trained on log(L_k + eps), whose gradient is
g_k / (L_k + eps). Gradient-magnitude balancing: an exponential moving average of each
task's log-loss gradient, b_k <- beta_t b_k + (1 - beta_t) g_k / (L_k + eps) with
beta_t = beta / t^sigma (b = 0 at the start, t the step count from 1), and the update
sum_k alpha_k b_k with alpha_k = max_j |b_j| / (|b_k| + 1e-8): every balanced term has the
norm of the largest. beta = 0.9, sigma = 0 (the authors' defaults). Task-specific
parameters get the gradient of sum_k log(L_k + eps).

The K x P averages are a buffer of the weighting (checkpointed with it). A task with no
valid target in the batch (a zero loss, ``ctx.present_tasks``) takes no part in the step:
it keeps its average, and alpha and the update are taken over the present tasks' averages
(its stale one would otherwise set the scale, or take a weight of max_j |b_j| / 1e-8 at
the start); no log of its zero loss is taken. With no task left the shared parameters get
no gradient. Only ``params`` gradients: the averages carry over steps, which the
per-sample representation gradients do not.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import present_rows, task_index
from mtlkit.registry import Params

from ._common import check_grads, require_tasks, sized_buffer


class DBMTLParams(Params):
    beta: float = Field(0.9, ge=0, lt=1)  # EMA factor of the gradients
    beta_sigma: float = Field(0.0, ge=0)  # beta_t = beta / t^sigma
    eps: float = Field(1e-8, gt=0)  # inside log(L + eps)


class DBMTL(Weighting):
    requires_grads = "shared"

    def __init__(self, params: DBMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("db_mtl", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        self.beta, self.sigma, self.eps = float(params.beta), float(params.beta_sigma), float(params.eps)
        self.step = 0
        self.register_buffer("ema", torch.zeros(len(self.task_names), 0))
        self._alpha: torch.Tensor | None = None
        self._alpha_tasks: list[str] = []

    def combine(self, losses):
        terms = [torch.log(losses[t] + self.eps) for t in self.all_tasks if t in losses]
        if not terms:
            raise ValueError("weighting 'db_mtl': none of the tasks has a loss")
        return sum(terms[1:], terms[0])

    def backward(self, ctx):
        """The default gradient-level step, with the heads' coefficients dlog(L + eps)/dL
        taken at the global batch's losses (the default takes combine's derivative at each
        rank's own losses: under torchrun 1/L_rank, not 1/L)."""
        losses = ctx.global_losses()
        coef = {t: 1.0 / (losses[t] + self.eps) for t in ctx.task_names}
        grads = ctx.task_gradients(private_weights=coef)
        present = ctx.present_tasks()
        ctx.set_gradient(self.update(present_rows(grads, ctx.task_names, present), losses, present)
                         if present else None)

    def combine_grads(self, grads, losses):
        check_grads("db_mtl", grads, self.task_names)
        return self.update(grads, losses, self.task_names)

    def update(self, grads, losses, names):
        """One step of the averages (rows of ``grads``: the tasks ``names``); the update
        sum_k alpha_k b_k over those tasks."""
        self.step += 1
        ema = sized_buffer(self, "ema", len(self.all_tasks), grads)
        rows = task_index(self.all_tasks, names, grads.device)
        scale = torch.stack([losses[t].detach().to(grads) + self.eps for t in names])
        beta_t = self.beta / self.step ** self.sigma
        b = beta_t * ema[rows] + (1 - beta_t) * grads / scale[:, None]
        ema[rows] = b
        norms = torch.linalg.vector_norm(b, dim=1)
        alpha = norms.max() / (norms + 1e-8)  # on the device: no read-back
        self._alpha, self._alpha_tasks = alpha.detach(), list(names)
        return alpha @ b

    def weights(self):
        # alpha of the last step's tasks (task_names: the present ones after a step that left some out)
        if self._alpha is None:
            return {t: 1.0 for t in self.task_names}
        # 0-dim device tensors (alpha is a new tensor each step)
        alpha = dict(zip(self._alpha_tasks, self._alpha.unbind()))
        return {t: alpha.get(t, 0.0) for t in self.task_names}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state.get("step", 0))


@hookimpl
def register_weightings(register):
    register(
        "db_mtl",
        DBMTL,
        params=DBMTLParams,
        description="DB-MTL (Lin et al. 2023): log losses, then gradient magnitudes balanced to the largest",
    )
