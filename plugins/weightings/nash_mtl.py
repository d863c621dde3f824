"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among task gradients.

The update d = sum_k alpha_k g_k with alpha > 0 solving (G G^T) alpha = 1 / alpha, i.e.
g_k . d = 1 / alpha_k. That equation is the stationarity condition of the strictly convex

    f(alpha) = 1/2 alpha^T M alpha - sum_k log alpha_k,   M = G G^T,

so a damped Newton method (kept inside alpha > 0) solves it, instead of the authors'
sequence of convex programs.

It is solved in the normalised space: with n_k = |g_k| and beta = n * alpha the equation
reads beta_k (C beta)_k = 1 for the correlation matrix C = M / (n n^T), and alpha = beta / n
solves the original one exactly. C has a unit diagonal whatever the norms, so the Newton
steps are as accurate at a 1e6 spread of gradient norms as at none; in the raw space the
Hessian spans the squared spread and the small-norm tasks drown.

When no direction improves every task (0 in the gradients' convex hull) f has no
minimiser; a ridge ``ridge * I`` added to C (i.e. ``ridge * n_k^2`` on each task's own
diagonal) keeps the solution finite there. A ridge on M scaled by its mean diagonal would
impose the largest task's scale on all: at a 1e3 spread it outweighs a small task's own
diagonal and leaves its equation 35% off. This one moves the equation to
beta_k (C beta)_k = 1 - ridge beta_k^2 exactly, so the residual of the original equation
is ridge * beta_k^2 plus the solver's ``tol``, at any spread: 1e-6 at the default for
orthogonal gradients (beta = 1), about 2e-5 for strongly conflicting ones (beta ~ 4);
``ridge = 0`` solves the original equation wherever it has a solution.

Two options of the paper's training procedure (section 5, and the authors' code):
``update_weights_every = T`` solves for alpha on every T-th step only and reuses the last
alpha in between (the update is still alpha @ G of the step's own gradients: the weights
are reused, not the direction); ``max_norm > 0`` rescales the shared update to at most that
L2 norm (like ``torch.nn.utils.clip_grad_norm_``: factor max_norm / (|d| + 1e-6), at most
1; ``grad_target = "params"`` only). The authors' experiments clip at 1.0; the default
here, 0, leaves the update alone, so earlier mtlkit runs keep their results. The step
count and the last alpha are checkpoint state. The steps in between take no per-task
passes (as the authors' code): one backward of sum_k alpha_k L_k for the shared rows and
one through the task branches for their plain loss gradients.

``solver = "device"`` solves the same equation by the same damped Newton method on the
device, for exactly ``device_iters`` iterations with a vectorised line search
(``_newton_device``): no step reads anything, and alpha stays on the device (0-dim float64
tensors, reused as they are between solves; the clipping is computed there too). The
checkpoint state stays JSON: ``get_state`` reads alpha when a checkpoint is written.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from mtlkit.engine import distributed as D
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl

from mtlkit.step_context import to_device

from ._common import GramWeighting, SolverParams, check_grads, gram, gram_norms, host_gram, weighted_sum
from ._newton_device import device_nash_weights


class NashMTLParams(SolverParams):
    ridge: float = Field(1e-6, ge=0)  # ridge on the correlation matrix, see the module docstring
    max_iter: int = Field(100, ge=1)  # Newton iterations at most
    tol: float = Field(1e-10, gt=0)  # stop when max_k |beta_k ((C + ridge I) beta)_k - 1| is below this
    update_weights_every: int = Field(1, ge=1)  # solve for alpha every T steps, reuse it in between
    max_norm: float = Field(0.0, ge=0)  # clip the shared update's L2 norm to this (0: no clipping)
    # 20: three times the most the device solver took to reach tol in the measured cases
    device_iters: int = Field(20, ge=1, le=1000, description="solver = device: damped Newton iterations, a "
                              "fixed count (an iterate within tol stays where it is)")


def nash_weights(m: np.ndarray, ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10,
                 power: float = 1.0) -> np.ndarray:
    """alpha > 0 with (M alpha)_k = alpha_k^-power: Nash-MTL's equation at ``power`` 1,
    FairGrad's (alpha-fairness, power = 1 / its alpha) otherwise.

    In the normalised space (beta = n alpha) the equation reads (C beta)_k = c_k beta_k^-power
    with c_k = n_k^(power - 1) (1 at power 1: the scale-free case), the stationarity
    condition of the strictly convex 1/2 beta^T C beta - sum_k c_k phi(beta_k), phi = log at
    power 1 and beta^(1 - power) / (1 - power) otherwise; a damped Newton method minimises it.
    """
    k = m.shape[0]
    n = gram_norms(m)
    live = n > 0
    alpha = np.ones(k)
    if not live.any():  # every gradient is zero: any weights give the same (zero) update
        return alpha
    # a zero gradient takes no part in the bargaining (its equation cannot hold): solve the
    # others, and leave it a weight of 1 that multiplies a zero vector anyway
    nl = n[live]
    cc = m[np.ix_(live, live)] / np.outer(nl, nl) + ridge * np.eye(int(live.sum()))
    one = power == 1.0
    wt = np.ones(len(nl)) if one else nl ** (power - 1.0)
    # start on the best point of the ray beta = tau 1 (exact when the gradients are orthogonal)
    if one:
        beta = np.full(len(nl), np.sqrt(len(nl) / max(float(cc.sum()), 1e-300)))
    else:
        beta = np.full(len(nl), (float(wt.sum()) / max(float(cc.sum()), 1e-300)) ** (1.0 / (1.0 + power)))

    def f(x: np.ndarray) -> float:
        if one:
            return 0.5 * float(x @ cc @ x) - float(np.sum(np.log(x)))
        return 0.5 * float(x @ cc @ x) - float(np.sum(wt * x ** (1.0 - power))) / (1.0 - power)

    last = np.inf
    for _ in range(max_iter):
        cb = cc @ beta
        pull = 1.0 / beta if one else wt * beta ** -power
        res = float(np.abs(beta * cb - 1.0).max()) if one else float(np.abs(cb / pull - 1.0).max())
        # the equation itself (scale-free), or rounding: full Newton steps that no longer
        # halve the residual are past quadratic convergence, in a badly conditioned C
        if res <= tol or res > 0.5 * last:
            break
        grad = cb - pull
        curv = 1.0 / beta**2 if one else power * pull / beta
        try:
            step = np.linalg.solve(cc + np.diag(curv), grad)
        except np.linalg.LinAlgError:  # ridge 0 and no solution: beta ran off to infinity
            break
        decrement = float(grad @ step)  # squared Newton decrement
        if not decrement > 0:  # rounding only: no descent left to find
            break
        t = 1.0
        # f is self-concordant at power 1, so once the decrement is below 0.1 the full step
        # stays feasible and converges quadratically; a line search there would only stall
        # on f's rounding, which is far above the decrease left to make. Other powers have
        # no such bound: they search a step until the decrease is down to f's rounding.
        near = decrement <= 0.1 if one else decrement <= 1e-12 * (1.0 + abs(f(beta)))
        last = res if near else np.inf
        if not near:
            # damped phase: stay strictly positive, then backtrack until f decreases (Armijo)
            while np.any(beta - t * step <= 0):
                t *= 0.5
            fx = f(beta)
            while f(beta - t * step) > fx - 0.25 * t * decrement and t > 1e-12:
                t *= 0.5
        elif not one:  # other powers: near the solution too, never step out of beta > 0
            while np.any(beta - t * step <= 0) and t > 1e-12:
                t *= 0.5
        beta = np.maximum(beta - t * step, 1e-300)
    alpha[live] = beta / nl
    return alpha


class NashMTL(GramWeighting):
    method = "nash_mtl"
    initial_coefficient = 1.0
    # host_reads_per_step = 1 (GramWeighting's) on a step that solves; the steps between
    # solves (update_weights_every > 1) read nothing: they reuse the weights kept on the host.
    # solver = "device": 0 (use_solver), alpha's values are 0-dim tensors on the device

    def __init__(self, params: NashMTLParams, task_names: list[str]) -> None:
        super().__init__(task_names, params.grad_target)
        self.ridge = float(params.ridge)
        self.max_iter = params.max_iter
        self.tol = params.tol
        self.every = params.update_weights_every
        self.max_norm = float(params.max_norm)
        if self.max_norm > 0 and self.grad_target != "params":
            raise ConfigError("weighting 'nash_mtl': max_norm clips the shared parameters' update, "
                              "it needs grad_target = \"params\"")
        self.device_iters = params.device_iters
        self.use_solver(params.solver)
        self.step = 0  # combine_grads calls so far
        self.alpha: dict = {}  # the last solved alpha, by task (floats; device: 0-dim tensors)

    def device_coefficients(self, m, losses):
        return device_nash_weights(m, self.ridge, self.device_iters, self.tol)

    def device_alpha(self, device) -> torch.Tensor:
        """The kept alpha of ``task_names`` (0 where none) as a float64 K-vector on ``device``,
        with no read: kept device values as they are, host ones (after ``set_state``) copied."""
        return torch.stack([a.to(device) if isinstance(a, torch.Tensor) else
                            to_device(torch.tensor(float(a), dtype=torch.float64), device)
                            for a in (self.alpha.get(t, 0.0) for t in self.task_names)])

    def coefficients(self, m, extra=None):
        return nash_weights(m, self.ridge, self.max_iter, self.tol)

    def backward(self, ctx):
        names = [t for t in ctx.task_names if ctx.losses[t].requires_grad]
        if not (self.step % self.every != 0 and names and all(t in self.alpha for t in names)):
            ctx.backward_gradients(self.combine_grads)
            return
        # a step between solves: the last weights, and no per-task passes (as the authors'
        # code): one pass of sum_k alpha_k L_k for the shared rows, one through the branches
        self.step += 1
        if self.solver == "device":
            self._coefs = self.device_alpha(ctx.losses[names[0]].device)
            alpha = {t: a.to(ctx.losses[t].dtype) for t, a in zip(self.task_names, self._coefs)}
        else:
            self._coefs = np.array([self.alpha.get(t, 0.0) for t in self.task_names])
            alpha = self.alpha
        rows = list(ctx.shared_params) if self.grad_target == "params" else list(ctx.representation)
        weighted = sum(alpha[t] * ctx.losses[t] for t in names)
        grads = torch.autograd.grad(weighted, rows, retain_graph=True, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1) for g, x in zip(grads, rows)])
        if self.grad_target == "params":
            D.all_reduce_mean_(flat, ctx.dist)  # the global batch's update, as set_gradient expects
            ctx.set_gradient(self.clipped(flat))
        else:  # set_gradient takes this rank's block of the ranks' rows side by side, / world size
            world, rank = (ctx.dist.world_size, ctx.dist.rank) if ctx.dist.enabled else (1, 0)
            full = flat.new_zeros(world * flat.numel())
            full[rank * flat.numel():(rank + 1) * flat.numel()] = flat / world
            ctx.set_gradient(full)
        rest = list(ctx.private_params) if self.grad_target == "params" else \
            list(ctx.shared_params) + list(ctx.private_params)
        total = sum(ctx.losses[t] for t in names)
        for p, g in zip(rest, torch.autograd.grad(total, rest, allow_unused=True)):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def combine_grads(self, grads, losses):
        check_grads(self.method, grads, self.task_names)
        reuse = self.step % self.every != 0 and all(t in self.alpha for t in self.task_names)
        self.step += 1
        if self.solver == "device":  # no read: alpha stays on the device
            coef = self.device_alpha(grads.device) if reuse else \
                self.device_coefficients(gram(grads, host=False), losses)
            if not reuse:
                self.alpha.update(zip(self.task_names, coef.unbind()))
            self._coefs = coef.clone()
            d = weighted_sum(coef, grads)
        else:
            if reuse:
                coef = np.array([self.alpha[t] for t in self.task_names])
            else:
                coef = self.coefficients(host_gram(grads)[0])
                self.alpha.update(zip(self.task_names, coef.tolist()))  # numpy's tolist: python floats
            d = self.apply_coefficients(coef, grads)
        return self.clipped(d)

    def clipped(self, d):
        """``d`` scaled to norm at most ``max_norm`` (0: off), on the device: no read-back."""
        if self.max_norm > 0:
            d = d * (self.max_norm / (torch.linalg.vector_norm(d) + 1e-6)).clamp(max=1.0)
        return d

    def get_state(self):  # JSON; solver = device: alpha read here, when a checkpoint is written
        return {"step": self.step, "alpha": {t: float(a) for t, a in self.alpha.items()}}

    def set_state(self, state):
        self.step = int(state.get("step", 0))
        self.alpha = {str(t): float(a) for t, a in state.get("alpha", {}).items()}


@hookimpl
def register_weightings(register):
    register(
        "nash_mtl",
        NashMTL,
        params=NashMTLParams,
        description="Nash-MTL (Navon et al. 2022): Nash bargaining solution, (G G^T) alpha = 1/alpha",
    )
