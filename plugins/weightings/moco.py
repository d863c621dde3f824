"""MoCo: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan &
Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
Approach", ICLR 2023).

Stochastic MGDA is biased: the min-norm weights of noisy gradients are not those of the
true ones. MoCo tracks each task's gradient with a running estimate y_k and moves the
weights lambda by one projected gradient step of MGDA's objective per step (t from 1):

    y_k    <- y_k - beta_t (y_k - h_k),                      beta_t  = beta / t^beta_sigma
    lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda),  gamma_t = gamma / t^gamma_sigma
    d      =  Y^T lambda

(Algorithm 1 of the paper; y = 0 and lambda = 1/K at the start). h_k is the task gradient,
rescaled to norm L_k (h_k = g_k L_k / (|g_k| + 1e-8)) with ``normalize = "loss"`` as in the
authors' multi-task code, or g_k itself with ``"none"``. Defaults beta = 0.5,
beta_sigma = 0.5, gamma = 0.1, gamma_sigma = 0.5, rho = 0 are the authors' (via LibMTL,
which replaces the projection by a softmax).

Y (K x P) is a buffer of the weighting, checkpointed with it; lambda and t are JSON state.
A task left out of a step (no valid target: the engine leaves its zero-loss task out) keeps its
estimate y_k and its lambda_k: the step is taken on the present tasks' face of the
simplex, from their lambdas rescaled to sum to 1 (with no mass there, from equal ones),
and their new lambdas are stored back at their old share of the mass. At the start the
step is then MoCo's on the other tasks alone; its stale y_k never enters d. Only
``params`` gradients: the estimates carry over steps, which per-sample representation
gradients do not.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.hookspecs import hookimpl
from mtlkit.step_context import to_device
from mtlkit.registry import Params

from ._common import check_grads, gram, require_tasks, sized_buffer


class MoCoParams(Params):
    beta: float = Field(0.5, gt=0, le=1)  # step size of the gradient tracking
    beta_sigma: float = Field(0.5, ge=0)  # its decay: beta / t^beta_sigma
    gamma: float = Field(0.1, gt=0)  # step size of the weights
    gamma_sigma: float = Field(0.5, ge=0)  # its decay: gamma / t^gamma_sigma
    rho: float = Field(0.0, ge=0)  # l2 regularisation of the weights' step
    normalize: Literal["loss", "none"] = "loss"  # h_k = g_k L_k / |g_k| (authors' code) or g_k


def simplex_projection(v: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based; Held, Wolfe & Crowder 1974).

    A tensor stays a tensor on its device: the number r of positive entries is found by a
    reduction, never read back."""
    if not isinstance(v, torch.Tensor):
        return simplex_projection(torch.from_numpy(np.asarray(v, dtype=np.float64))).numpy()
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0) - 1.0
    idx = torch.arange(1, len(v) + 1, device=v.device)
    # the largest r with u_r - css_r / r > 0 (r = 1 always qualifies for finite v)
    r = torch.where(u - css / idx > 0, idx, 1).max().reshape(1)
    return torch.clamp(v - css.gather(0, r - 1) / r, min=0.0)


class MoCo(Weighting):
    requires_grads = "shared"

    def __init__(self, params: MoCoParams, task_names: list[str]) -> None:
        super().__init__(task_names)
        require_tasks("moco", self.task_names, 2)
        self.all_tasks = list(self.task_names)
        self.p = params
        self.step = 0
        # the weights lambda (float64, on the estimates' device; JSON state) and, after a step
        # that left tasks out, the ones it used: tensors, read with the losses once per log interval
        self.lam = torch.full((len(self.all_tasks),), 1.0 / len(self.all_tasks), dtype=torch.float64)
        self.register_buffer("y", torch.zeros(len(self.all_tasks), 0))
        self._step_lam: dict[str, torch.Tensor] = {}

    def combine_grads(self, grads, losses):
        check_grads("moco", grads, self.task_names)
        p = self.p
        self.step += 1
        y = sized_buffer(self, "y", len(self.all_tasks), grads)
        rows = [self.all_tasks.index(t) for t in self.task_names]
        h = grads
        if p.normalize == "loss":
            scale = torch.stack([losses[t].detach().to(grads) for t in self.task_names])
            h = grads * (scale / (torch.linalg.vector_norm(grads, dim=1) + 1e-8))[:, None]
        beta_t = p.beta / self.step ** p.beta_sigma
        if len(rows) == len(self.all_tasks):  # in place: one pass over the K x P estimates
            y.lerp_(h, beta_t)
            ys = y
        else:
            y[rows] = y[rows].lerp_(h, beta_t)
            ys = y[rows]
        yy = gram(ys, host=False)  # K x K in float64 (chunked), on the device: nothing is read back
        full = self.lam.to(yy.device, copy=True)
        index = to_device(rows, yy.device, torch.long)
        lam = full[index]
        if len(rows) < len(self.all_tasks):  # the present tasks' face: their lambdas, summing to 1
            mass = lam.sum()
            lam = torch.where(mass > 0, lam / torch.where(mass > 0, mass, 1.0), 1.0 / len(rows))
        gamma_t = p.gamma / self.step ** p.gamma_sigma
        eye = torch.eye(len(rows), dtype=torch.float64, device=yy.device)
        lam = simplex_projection(lam - gamma_t * (yy + p.rho * eye) @ lam)
        if len(rows) < len(self.all_tasks):
            full[index] = lam * mass
        else:
            full = lam
        self.lam, self._step_lam = full, dict(zip(self.task_names, lam))
        return lam.to(y.dtype) @ ys

    def combine(self, losses):
        # task-specific parameters: each head its own loss
        return sum(losses[t] for t in self.all_tasks if t in losses)

    def weights(self):
        if self.task_names == self.all_tasks:
            return dict(zip(self.all_tasks, self.lam))
        # after a step that left tasks out (task_names: the present ones): the lambdas it used
        return {t: self._step_lam.get(t, 0.0) for t in self.task_names}

    def get_state(self):
        return {"step": self.step, "lambda": self.lam.tolist()}

    def set_state(self, state):
        self.step = int(state.get("step", 0))
        lam = state.get("lambda")
        if lam is not None:
            if len(lam) != len(self.all_tasks):
                raise ValueError(f"weighting 'moco': state has {len(lam)} weights for {len(self.all_tasks)} tasks")
            self.lam = torch.tensor([float(x) for x in lam], dtype=torch.float64, device=self.lam.device)


@hookimpl
def register_weightings(register):
    register(
        "moco",
        MoCo,
        params=MoCoParams,
        description="MoCo (Fernando et al. 2023): tracked task gradients, projected step on MGDA's weights",
    )
