"""The gradient-level backward: per-task gradients of the shared parameters (``params``) or
of the shared representation (``features``), their DDP exchange, ``combine_grads`` over
the tasks present, and the combined update (see :mod:`mtlkit.step_context`).

Passes: one ``torch.autograd.grad`` per task, over the rows' tensors *and* the parameters
that get ``sum_t w_t dL_t/dp`` (task-specific ones; with ``features`` also shared ones
after the representation), so no pass of its own is spent on them. ``w_t`` is
``dcombine/dL_t`` at this step's losses, from a backward through ``combine`` alone (a
graph of K scalars), which also gives the weighting's own parameters their gradient.
(A batched variant, one ``is_grads_batched`` pass, gives the same result and measured
slower on CPU: see ``BATCHED`` and docs/performance.md.)

Distributed: ``params`` rows are averaged across ranks (all-reduce); ``features`` rows
live on each rank's own samples, so the ranks' rows are gathered side by side (rank
blocks, divided by the world size: the global batch's matrix); every rank then holds the
same K x N matrix and ``combine_grads`` gives every rank the same update. Each rank
back-propagates its block (times the world size) through its trunk, and the engine then
averages the trunk's gradients with the rest. Every rank must hold the same
representation size (the engine's sharding pads the ranks to equal batches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import TrainingError
from ..step_context import CombineGrads, StepContext, present_rows
from . import distributed as D
from .early_read import EarlyRead

if TYPE_CHECKING:  # pragma: no cover
    from ..contracts import Weighting


def loss_scale(ctx: StepContext) -> Tensor | None:
    """training.precision = "fp16": the loss scale (a device tensor), else None.

    Under fp16 every gradient the step leaves in ``.grad`` is at this scale (the scaler's
    step unscales them all and skips a step that overflowed), while the rows a weighting
    sees (``task_gradients``) and the vectors it hands back are true, unscaled gradients."""
    precision = getattr(ctx.engine, "precision", None)
    return None if precision is None else precision.scale_factor()


def combine_coefficients(weighting: "Weighting", losses: dict[str, Tensor],
                         scale: Tensor | None = None) -> dict[str, Tensor | None]:
    """``dcombine/dL_t`` at these losses (None: combine does not depend on L_t); the
    weighting's trainable parameters get their gradient of ``combine(losses)`` in ``.grad``
    (times ``scale`` under fp16, like every gradient the scaler's step unscales)."""
    leaves = {t: v.detach().requires_grad_() for t, v in losses.items()}
    params = [p for p in weighting.parameters() if p.requires_grad]
    total = weighting.combine(leaves)
    if not isinstance(total, Tensor) or not total.requires_grad:
        return dict.fromkeys(leaves)
    grads = torch.autograd.grad(total, list(leaves.values()) + params, allow_unused=True)
    for p, g in zip(params, grads[len(leaves):]):
        if g is not None:
            p.grad = g.detach() if scale is None else g.detach() * scale
    return {t: (None if g is None else g.detach()) for t, g in zip(leaves, grads)}


def _rows_of(ctx: StepContext, target: str) -> list[Tensor]:
    if target == "params":
        return list(ctx.shared_params)
    if ctx.representation is None:
        raise TrainingError("weighting: asked for gradients on 'features', but this step has no shared "
                            "representation (set the weighting's grad_target = \"features\")")
    return list(ctx.representation)


def task_gradients(ctx: StepContext, target: str, private_weights: dict[str, Any] | None,
                   retain_graph: bool) -> Tensor:
    """K x N per-task gradients (see :meth:`StepContext.task_gradients`)."""
    rows_of = _rows_of(ctx, target)
    extra: list[nn.Parameter] = []
    if private_weights is not None:
        # features: every trainable parameter; those before the cut get None (not in the graph)
        extra = list(ctx.private_params) if target == "params" else list(ctx.shared_params) + list(ctx.private_params)
    scale = loss_scale(ctx)
    # filled row by row (a piece with no gradient, or a task with no graph, is zeroed then)
    G = torch.empty(len(ctx.task_names), sum(x.numel() for x in rows_of), dtype=rows_of[0].dtype,
                    device=rows_of[0].device)
    if BATCHED and scale is None:  # the batched variant has no loss scaling (fp16 takes the loop)
        _batched(ctx, rows_of, extra, G, private_weights, retain_graph)
    else:
        _per_task(ctx, rows_of, extra, G, private_weights, retain_graph, scale)
    if ctx.dist.enabled:
        G = D.all_reduce_mean_(G, ctx.dist) if target == "params" else gather_rows(G, ctx.dist)
    if scale is not None:
        # global already, so every rank sees an overflow; no host read: set_gradient hands
        # the scaler non-finite gradients then, and its step is skipped
        overflow = ~torch.isfinite(G).all()
        ctx.engine.overflow = overflow if getattr(ctx.engine, "overflow", None) is None \
            else ctx.engine.overflow | overflow
        G = torch.nan_to_num(G.float() / scale, nan=0.0, posinf=0.0, neginf=0.0)
    return G


def _fill_rows(rows: Tensor, grads: tuple[Tensor | None, ...], sizes: list[int]) -> None:
    """Write the flattened ``grads`` (one per tensor of the rows, None: zero) into ``rows``
    (``... x N``) side by side."""
    offset = 0
    for g, n in zip(grads, sizes):
        if g is not None:
            rows[..., offset:offset + n] = g.reshape(*rows.shape[:-1], n)
        else:
            rows[..., offset:offset + n].zero_()
        offset += n


def _per_task(ctx: StepContext, rows_of: list[Tensor], extra: list[nn.Parameter], G: Tensor,
              private_weights: dict[str, Any] | None, retain_graph: bool, scale: Tensor | None) -> None:
    """One ``torch.autograd.grad`` per task: its row of G, and ``sum_t w_t dL_t/dp`` for the
    ``extra`` parameters."""
    names, sizes = ctx.task_names, [x.numel() for x in rows_of]
    acc: dict[int, Tensor] = {}
    for k, t in enumerate(names):
        loss = ctx.losses[t]
        if not loss.requires_grad:  # nothing to differentiate: a zero row
            G[k].zero_()
            continue
        if scale is not None:
            loss = loss * scale
        last = k == len(names) - 1
        grads = torch.autograd.grad(loss, rows_of + extra, retain_graph=retain_graph or not last, allow_unused=True)
        _fill_rows(G[k], grads, sizes)
        w = private_weights.get(t) if private_weights is not None else None
        if w is None:
            continue
        for p, g in zip(extra, grads[len(rows_of):]):
            if g is not None:
                g = g * w
                acc[id(p)] = g if id(p) not in acc else acc[id(p)] + g
    for p in extra:
        if id(p) in acc:
            p.grad = acc[id(p)].detach() if p.grad is None else p.grad + acc[id(p)].detach()


# the K per-task passes as one vmapped pass (torch.autograd.grad(..., is_grads_batched=True)):
# the same result; measured slower on CPU (docs/performance.md), so off; bench/weighting_step.py
# flips it to measure it again
BATCHED = False


def _batched(ctx: StepContext, rows_of: list[Tensor], extra: list[nn.Parameter], G: Tensor,
             private_weights: dict[str, Any] | None, retain_graph: bool) -> None:
    """``_per_task`` in one batched backward pass (see ``BATCHED``)."""
    names = ctx.task_names
    losses = torch.stack([ctx.losses[t].reshape(()) for t in names])
    eye = torch.eye(len(names), dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, rows_of + extra, grad_outputs=eye, is_grads_batched=True,
                                retain_graph=retain_graph, allow_unused=True)
    _fill_rows(G, grads, [x.numel() for x in rows_of])
    if private_weights is not None:
        w = torch.stack([torch.as_tensor(0.0 if private_weights.get(t) is None else private_weights[t],
                                         dtype=losses.dtype, device=losses.device) for t in names])
        for p, g in zip(extra, grads[len(rows_of):]):
            if g is not None:
                c = torch.tensordot(w, g, dims=1)
                p.grad = c if p.grad is None else p.grad + c


def gather_rows(G: Tensor, dist_ctx: D.DistContext) -> Tensor:
    """The ranks' K x N representation rows side by side (rank order), / world size."""
    n = torch.tensor([G.shape[1]], dtype=torch.int64)
    ns = D.all_reduce_sum(n, dist_ctx)
    if int(ns) != G.shape[1] * dist_ctx.world_size:
        raise TrainingError("grad_target = \"features\" under torchrun needs the same representation size "
                            "on every rank (equal batches)")
    buf = G.to(dist_ctx.device) if dist_ctx.device.type == "cuda" else G
    parts = [torch.empty_like(buf) for _ in range(dist_ctx.world_size)]
    dist.all_gather(parts, buf.contiguous())
    return torch.cat(parts, 1).to(G.device) / dist_ctx.world_size


def global_losses(ctx: StepContext) -> dict[str, Tensor]:
    """The step's losses averaged over ranks, each in its own dtype (float64 in transit)."""
    names = ctx.task_names
    mean = torch.stack([ctx.losses[t].detach().reshape(()).to(torch.float64) for t in names])
    D.all_reduce_mean_(mean, ctx.dist)
    return {t: mean[k].to(ctx.losses[t].dtype) for k, t in enumerate(names)}


def set_gradient(ctx: StepContext, combined: Tensor | None, target: str) -> None:
    """``combined`` as the shared parameters' gradient, or back through the trunk."""
    rows_of = _rows_of(ctx, target)
    total = sum(x.numel() for x in rows_of)
    world = ctx.dist.world_size if target == "features" else 1
    if combined is not None and combined.shape != (total * world,):
        raise TrainingError(f"weighting: combine_grads returned shape {tuple(combined.shape)}, "
                            f"expected ({total * world},)")
    scale = loss_scale(ctx)
    if combined is not None and scale is not None:  # back to the scaler's scale (see loss_scale)
        overflow = getattr(ctx.engine, "overflow", None)
        combined = combined * scale
        if overflow is not None:
            combined = torch.where(overflow, torch.full_like(combined, float("inf")), combined)
    if target == "params":
        offset = 0
        for p in rows_of:
            n = p.numel()
            # no task to learn from: no gradient, so the optimiser leaves the trunk alone
            # (a zero gradient would still move it by momentum and weight decay)
            p.grad = None if combined is None else combined[offset:offset + n].detach().view_as(p).clone()
            ctx.global_grads.add(id(p))
            offset += n
        return
    if combined is None:
        return
    local = combined.detach()
    if world > 1:  # this rank's block, at the scale of its own mean loss (averaged later)
        local = local[ctx.dist.rank * total:(ctx.dist.rank + 1) * total] * world
    sources = ctx.representation_sources or []
    pieces, outs, offset = [], [], 0
    for src, x in zip(sources, rows_of):
        n = x.numel()
        if src.requires_grad:
            outs.append(src)
            pieces.append(local[offset:offset + n].view_as(src).to(src.dtype))
        offset += n
    if outs:
        torch.autograd.backward(outs, grad_tensors=pieces)


def start_presence(ctx: StepContext, losses: dict[str, Tensor] | None = None) -> EarlyRead:
    """Start reading which tasks take part in this step (see :func:`present_tasks`): the
    K flags (global loss != 0, or ``losses``' when given) are copied to the host while the
    backward passes run."""
    values = losses if losses is not None else ctx.global_losses()
    return EarlyRead(torch.stack([values[t].detach().reshape(()) != 0 for t in ctx.task_names]))


def present_tasks(step: Any, ctx: StepContext, losses: dict[str, Tensor] | None = None) -> list[str]:
    """The tasks of ``ctx.task_names`` (in order) that take part in this step.

    A task with no valid target in the batch (every label ignored, every depth 0) has a
    zero loss and a zero gradient row: it is left out of the step's aggregation, its
    per-task state stays as it was, and the log reports its weight as 0. A task takes part
    when its global loss (``ctx.global_losses()``, or ``losses`` when given) is not 0; a
    NaN counts as present (the engine then stops on it). The losses are global, so every
    rank decides alike. The decision is made on the host: the step's flags were copied
    there right after the forward pass (:func:`start_presence`), so asking waits for the
    forward pass only, not for the backward passes queued since; other ``losses`` are
    read when asked. The step records it: ``weights()`` is then reported with
    ``task_names`` set to the present tasks, the others at 0 (see :func:`reported_weights`).
    """
    early = getattr(step, "early_presence", None)
    if early is None or (losses is not None and losses is not ctx.global_losses()):
        early = start_presence(ctx, losses)
    flags = early.result()
    names = list(ctx.task_names)
    present = [t for t, k in zip(names, flags) if k]
    step.present = present
    return present


def reported_weights(step: Any) -> dict[str, Any]:
    """What the log shows for this step: ``weighting.weights()``, or, when the step left
    tasks out (:func:`present_tasks`), the weights over the present tasks (its
    ``task_names`` set to them during the call) and 0 for the others. ``{}`` is a method's
    way of saying it reports no weights."""
    w = step.weighting
    full = list(w.task_names)
    present = getattr(step, "present", None)
    if present is None or present == full:
        return w.weights()
    if not present:
        return dict.fromkeys(full, 0.0)
    w.task_names = list(present)
    try:
        reported = w.weights()
    finally:
        w.task_names = full
    return {**dict.fromkeys(full, 0.0), **reported} if reported else {}


def combine_present(step: Any, ctx: StepContext, G: Tensor, losses: dict[str, Tensor],
                    combine_grads: CombineGrads) -> Tensor | None:
    """``combine_grads`` over the tasks that take part (None: no such task).

    Left in, a task with no valid target (a zero loss, a zero row) decides the aggregate:
    the min-norm point of a hull holding 0 is 0 (MGDA), IMTL-G puts all the weight on it;
    the trunk stops. Such tasks (and, with ``domain_order = "mixed"``, tasks without a batch this
    step) are left out (:func:`present_tasks`) and the weighting solves for the others:
    during the call its ``task_names`` lists the present tasks, in order, matching the
    rows of ``grads`` and the keys of ``losses``. The decision is made on the global
    losses, so every rank leaves out the same.
    """
    w = step.weighting
    full = list(w.task_names)
    present = present_tasks(step, ctx)
    if present == full:
        return combine_grads(G, losses)
    if not present:
        return None
    w.task_names = present
    try:
        return combine_grads(present_rows(G, ctx.task_names, present), {t: losses[t] for t in present})
    finally:
        w.task_names = full


def _weighting_grads_over(step: Any, ctx: StepContext, present: list[str], scale: Tensor | None) -> None:
    """The weighting's own parameters: the gradient of ``combine`` over the present tasks
    only (a left-out task's terms, IMTL-L's -s_k, would move its scale on a zero loss)."""
    params = [p for p in step.weighting.parameters() if p.requires_grad]
    if not params:
        return
    for p in params:
        p.grad = None
    if present:
        combine_coefficients(step.weighting, {t: ctx.losses[t] for t in present}, scale)


def backward_gradients(step: Any, ctx: StepContext, combine_grads: CombineGrads, target: str) -> None:
    """The default gradient-level backward (see :class:`mtlkit.contracts.Weighting`).

    Everything the weighting reads is global (averaged, or gathered for ``features``),
    the gradient rows and the task losses alike: with a rank's own losses (MGDA's loss
    normalisation) the ranks would choose different weights and the replicas drift.
    """
    scale = loss_scale(ctx)
    coefficients = combine_coefficients(step.weighting, ctx.losses, scale)
    G = task_gradients(ctx, target, coefficients, retain_graph=False)
    combined = combine_present(step, ctx, G, ctx.global_losses(), combine_grads)
    if len(step.present) < len(ctx.task_names):
        _weighting_grads_over(step, ctx, step.present, scale)
    set_gradient(ctx, combined, target)
