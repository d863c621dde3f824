"""Helpers shared by the weighting plugins (not a plugin itself: it registers nothing).

Gradient-level methods only ever need the K x K Gram matrix of the task gradients to find
their K weights, so they solve in that small space (float64, in numpy on the host, where a
solver's scalar loop does not pay a device sync per branch: ``host_gram`` is the step's
one read) and touch the K x P gradient matrix twice: once for the Gram matrix and once
for the weighted sum.

The Gram matrix is accumulated in float64 whatever the gradients' dtype (``gram``), and the
solvers work with norm-free quantities (correlations, cosines) wherever the gradient norms
would otherwise enter a linear solve or a stopping test: task gradient norms routinely
differ by orders of magnitude, and a solver tuned to the largest one ignores the rest.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pydantic import Field

from mtlkit.contracts import Weighting
from mtlkit.errors import ConfigError
from mtlkit.registry import Params
from mtlkit.step_context import to_device


class GradTargetParams(Params):
    """Params of a method whose gradients can be taken on either target (every Gram method)."""

    grad_target: Literal["params", "features"] = Field(
        "params", description="Gradients of the shared parameters (params) or of the shared representation "
        "the network exposes (features: much cheaper, exact for the trunk's output).")


class SolverParams(GradTargetParams):
    """Params of a Gram method that offers a solver on the device besides the exact one."""

    solver: Literal["exact", "device"] = Field(
        "exact", description="exact: the host-side solver on the K x K Gram matrix (one read from the device "
        "per step); device: a fixed number of iterations on the device (no read: the step never waits for "
        "the device), accurate to the tolerance stated in docs/weightings.md.")


def require_tasks(method: str, task_names: list[str], minimum: int = 2) -> None:
    """Refuse a task count the method is not defined for (one-line ConfigError)."""
    if len(task_names) < minimum:
        raise ConfigError(
            f"weighting '{method}' needs at least {minimum} tasks, got {len(task_names)} "
            f"({', '.join(task_names) or 'none'})"
        )


def check_grads(method: str, grads: Tensor, task_names: list[str]) -> None:
    if grads.dim() != 2 or grads.shape[0] != len(task_names):
        raise ValueError(
            f"weighting '{method}': expected grads of shape ({len(task_names)}, P), got {tuple(grads.shape)}"
        )


# float64 elements converted at a time by ``gram``, which bounds its extra memory: on the CPU
# 1 MiB, so each chunk stays in cache (six times faster than 32 MiB chunks, whose fresh pages
# and cache misses dominated); on an accelerator 32 MiB (fewer kernel launches)
GRAM_CHUNK = 1 << 17
GRAM_CHUNK_DEVICE = 1 << 22


def gram(grads: Tensor, host: bool = True) -> Tensor:
    """G G^T of the K x P gradient matrix, accumulated in float64, returned on the CPU
    (``host``: the step's one read, for a host-side solver) or left on the gradients'
    device (``host=False``: for a method whose K x K arithmetic stays there).

    float32 dot products of long, near-collinear rows lose the small differences that the
    solvers care about (|g_i - g_j|^2 = M_ii + M_jj - 2 M_ij cancels); products of float32
    (or half) numbers are exact in float64, so accumulating there leaves only float64
    rounding. Columns are converted chunk by chunk so that no float64 copy of the whole
    K x P matrix is made, on the gradients' own device (the P-long work stays there).
    """
    if grads.dtype == torch.float64:
        out = grads @ grads.T
        return out.cpu() if host else out
    if grads.device.type == "mps":  # no float64 on Apple GPUs: accumulate on the CPU instead
        grads = grads.cpu()
    k, p = grads.shape
    out = torch.zeros(k, k, dtype=torch.float64, device=grads.device)
    step = max(1, (GRAM_CHUNK if grads.device.type == "cpu" else GRAM_CHUNK_DEVICE) // max(k, 1))
    for start in range(0, p, step):
        block = grads[:, start:start + step].to(torch.float64)
        out += block @ block.T
    return out.cpu() if host else out


def gram_norms(m: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """The gradients' norms |g_k| from the Gram matrix's diagonal (numpy or torch, as ``m``);
    rounding can leave a zero gradient's entry a hair below 0: it counts as 0."""
    if isinstance(m, np.ndarray):
        return np.sqrt(np.maximum(np.diag(m), 0.0))
    return torch.diagonal(m).clamp_min(0.0).sqrt()


def host_gram(grads: Tensor, extra: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The step's one read for a host-side solver: the K x K float64 Gram matrix of
    ``grads`` (see ``gram``) as a numpy array, and ``extra`` (values the solver also needs,
    such as the losses; any shape, flattened, as float64: exact for float32 and half
    values) as a 1-D numpy array (empty when None), both from one transfer."""
    m = gram(grads, host=False)
    k = m.shape[0]
    flat = m.reshape(-1)
    if extra is not None:
        flat = torch.cat([flat, extra.detach().reshape(-1).to(flat.device, torch.float64)])
    values = np.array(flat.tolist(), dtype=np.float64)  # the one read (float64 -> float: exact)
    return values[:k * k].reshape(k, k), values[k * k:]


def weighted_sum(weights: Tensor | np.ndarray, grads: Tensor) -> Tensor:
    """sum_k weights[k] * grads[k], in the gradients' dtype and device.

    Host weights (a host solver's numpy array, a CPU tensor) go to the device with a
    non-blocking copy (``to_device``): a blocking one would wait for every kernel queued
    there, as a read does."""
    if isinstance(weights, np.ndarray):
        weights = torch.from_numpy(weights)
    return to_device(weights, grads.device, grads.dtype) @ grads


def sized_buffer(module: torch.nn.Module, name: str, rows: int, like: Tensor) -> Tensor:
    """The ``rows`` x P buffer ``name`` of ``module`` (registered in its ``__init__`` with
    P = 0), made zeros of the gradients' P, dtype and device on first use.

    Methods that keep P-long state across steps (MoCo, DB-MTL, ExcessMTL) hold it as buffers:
    the checkpoint saves them with the weighting (``weighting.<name>``), beside the model.
    """
    buf = getattr(module, name)
    p = like.shape[1]
    if buf.shape[1] == 0:
        buf = torch.zeros(rows, p, dtype=like.dtype, device=like.device)
        setattr(module, name, buf)
    elif buf.shape != (rows, p):
        raise ValueError(f"weighting: buffer '{name}' holds {tuple(buf.shape)}, the gradients are {rows} x {p}")
    return buf


def adam_step(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int | list[int] | Tensor, lr: float,
              betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              rows: list[int] | None = None) -> None:
    """One step of Adam (Kingma & Ba 2015; L2 weight decay added to the gradient, as
    ``torch.optim.Adam``) on the tensor ``x`` in place, with the moment buffers ``m`` and
    ``v``; ``t`` counts this step from 1 (or one count per entry stepped: a list, or a
    device tensor, read by nothing). For the small
    vectors a weighting learns with its own optimiser (FAMO's logits, GradNorm's and
    Auto-Lambda's weights): buffers, so the checkpoint carries them.

    ``rows``: step these entries only (``grad`` and a list ``t`` hold theirs, in order);
    the others (tasks left out of the step) keep their value and moments."""
    if rows is not None:
        index = to_device(rows, x.device, torch.long)
        xs, ms, vs = x[index], m[index], v[index]
        adam_step(xs, grad, ms, vs, t, lr, betas, eps, weight_decay)
        x[index], m[index], v[index] = xs, ms, vs
        return
    if isinstance(t, Tensor):  # the corrections rounded to m's dtype, as a Python number's are
        c1, c2 = ((1 - b ** t.to(torch.float64)).to(m.dtype) for b in betas)
    else:
        if not isinstance(t, int):
            t = t[0] if len(set(t)) == 1 else to_device(t, x.device, torch.float64)
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    g = grad + weight_decay * x if weight_decay else grad
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat = m / c1
    v_hat = v / c2
    x.sub_((lr * m_hat / (v_hat.sqrt() + eps)).to(x))


def task_steps(counts: list[int], rows: list[int]) -> list[int]:
    """Count one more Adam step for each of ``rows`` (indices into ``counts``, one per
    task); their counts, in order. A task left out of a step does not count it."""
    for k in rows:
        counts[k] += 1
    return [counts[k] for k in rows]


def step_counts(method: str, state: Any, k: int) -> list[int]:
    """Per-task step counts from JSON state: a list, or one int (older checkpoints)."""
    if isinstance(state, list):
        if len(state) != k:
            raise ValueError(f"weighting '{method}': state has {len(state)} step counts for {k} tasks")
        return [int(x) for x in state]
    return [int(state or 0)] * k


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-friendly list of bytes (``"rng"`` in a method's
    JSON state)."""
    return [int(b) for b in gen.get_state().tolist()]


def set_generator_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    """Restore ``gen`` from the ``"rng"`` entry of a method's JSON state (absent: a state
    written before the method drew anything; the seeded generator stays)."""
    if "rng" in state:
        gen.set_state(torch.tensor(list(state["rng"]), dtype=torch.uint8))


class GramWeighting(Weighting):
    """Gradient-level methods that choose K coefficients from the K x K Gram matrix of the
    task gradients (float64, see ``gram``) and return the coefficient-weighted sum of the
    gradients.

    Subclasses set ``method`` (its registered name, for errors) and implement
    ``coefficients(m, extra)`` on numpy arrays: ``m`` the Gram matrix, ``extra`` the values
    of ``host_extra(losses)`` read in the same transfer (empty by default);
    ``initial_coefficient`` (None: 1/K) is what ``weights()`` reports before the first step.
    A method that offers ``solver = "device"`` (its params derive from ``SolverParams``)
    calls ``use_solver(params.solver)`` and implements ``device_coefficients(m, losses)``:
    ``m`` the Gram matrix on the gradients' device (float64), ``losses`` the step's losses,
    returning the K coefficients there, with no read (no ``item``/``tolist``/``bool`` of a
    tensor, no Python branch on a tensor's value, fixed iteration counts).
    """

    requires_grads = "shared"
    grad_targets = ("params", "features")
    # One read per step: the K x K Gram matrix (with ``host_extra`` packed into the same
    # transfer, ``host_gram``), for a solver that runs in numpy on the host; the
    # coefficients go back to the device with the weighted sum (``weighted_sum``: no
    # wait), and ``weights()`` reports them from numpy (python floats).
    host_reads_per_step = 1
    solver = "exact"  # or "device": see use_solver
    method = "?"
    initial_coefficient: float | None = None

    def __init__(self, task_names: list[str], grad_target: str = "params") -> None:
        super().__init__(task_names)
        self.grad_target = grad_target
        require_tasks(self.method, self.task_names, 2)
        k = len(self.task_names)
        self._coefs = np.full(k, 1.0 / k if self.initial_coefficient is None else self.initial_coefficient)

    def use_solver(self, solver: str) -> None:
        """``exact`` (host, one read per step) or ``device`` (no read)."""
        self.solver = solver
        if solver == "device":
            self.host_reads_per_step = 0  # this instance's steps read nothing

    def device_coefficients(self, m: Tensor, losses) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def host_extra(self, losses) -> Tensor | None:
        """Values (on the device) the solver needs besides the Gram matrix: read with it."""
        return None

    def coefficients(self, m: np.ndarray, extra: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def combine_grads(self, grads: Tensor, losses) -> Tensor:
        check_grads(self.method, grads, self.task_names)
        if self.solver == "device":
            coef = self.device_coefficients(gram(grads, host=False), losses)
            self._coefs = coef.detach().clone()  # 0-dim tensors in weights(), read once per log interval
            return weighted_sum(coef, grads)
        m, extra = host_gram(grads, self.host_extra(losses))
        return self.apply_coefficients(self.coefficients(m, extra), grads)

    def apply_coefficients(self, coef: np.ndarray, grads: Tensor) -> Tensor:
        """Keep ``coef`` (numpy, float64) for ``weights()``; the weighted sum of ``grads``."""
        self._coefs = np.array(coef, dtype=np.float64)  # a copy: nothing writes it while it travels
        return weighted_sum(self._coefs, grads)

    def weights(self):
        if isinstance(self._coefs, Tensor):  # the device solver's: left there
            return dict(zip(self.task_names, self._coefs))
        return {t: float(c) for t, c in zip(self.task_names, self._coefs)}
