"""One training step: forward, task losses, the weighting's ``backward(ctx)`` (see
:mod:`mtlkit.step_context`), the DDP averaging DDP itself does not do, the optimiser step,
the weighting's ``on_step_end(ctx)``. The gradient-level machinery lives in
:mod:`.grad_step`.

Nothing here reads a value back from the device, with one exception: gradient-level
weightings (and the methods that ask, ``ctx.present_tasks``) need to know which tasks
take part at all (see ``grad_step.present_tasks``): K flags per step, copied to the host
right after the forward pass (:mod:`.early_read`), so the host waits for the forward pass
only, never for the backward passes queued after it. The step's losses and weights go
back to the caller as tensors, to be read once per log interval (:mod:`.readout`).

Distributed (torchrun)
----------------------
The model is wrapped in DistributedDataParallel by the trainer. A loss-level weighting
with the default ``backward`` and ``on_step_end`` lets DDP average the model's gradients;
the weighting's own parameters (outside DDP) get theirs averaged by hand. Every other step
(gradient-level, a weighting with its own ``backward`` or ``on_step_end``,
``domain_order = "mixed"``: several forward passes
or ``torch.autograd.grad`` calls, which DDP's reducer does not follow) runs under
``model.no_sync()``; what ``backward`` leaves in ``.grad`` is then averaged across ranks in
one flat all-reduce, except the gradients that are global already (the shared rows of
``grad_step``). See :mod:`.grad_step` for the per-task gradients under DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..contracts import Task, Weighting, split_parameters
from ..errors import ConfigError, TrainingError
from ..step_context import CombineGrads, StepContext
from . import distributed as D
from . import grad_step
from .checks import missing_key
from .config import TrainingConfig
from .precision import Precision, outputs_fp32


def targets(batch: dict, names: list[str], tasks: Mapping[str, Task], device: torch.device,
            where: str) -> dict[str, Tensor]:
    out = {}
    for t in names:
        key = tasks[t].target
        if key not in batch:
            raise missing_key(where, key, t, batch)
        out[t] = batch[key].to(device, non_blocking=True)
    return out


def forward(model: nn.Module, batch: dict, domain: str | None, tasks: Mapping[str, Task],
            device: torch.device, where: str, representation_hook=None,
            channels_last: bool = False) -> dict[str, Tensor]:
    if "image" not in batch:
        raise missing_key(where, "image", have=batch)
    x = batch["image"].to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = {} if representation_hook is None else {"representation_hook": representation_hook}
    out = model(x, tasks=[domain], **kw) if domain is not None else model(x, **kw)
    for t in [domain] if domain is not None else list(tasks):
        if t not in out:
            raise TrainingError(f"the model returned no output for task '{t}'")
    return out


# torch.compile modes that replay the compiled network as CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class _Cut:
    """A representation hook: keeps the trunk's tensors, hands the branches leaves that
    require grad (the per-task passes stop there)."""

    def __init__(self) -> None:
        self.sources: list[Tensor] | None = None
        self.leaves: list[Tensor] | None = None

    def __call__(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.sources is not None:
            raise TrainingError("model: the network called its representation hook twice in one forward pass")
        self.sources = list(tensors)
        self.leaves = [t.detach().requires_grad_() for t in tensors]
        return self.leaves


class TrainStep:
    """``step(batch, domain, epoch, step) -> (losses, weights)``: one update of model and
    weighting. ``domain``: None (one-to-many), a domain (many-to-many) or a tuple of domains
    (``domain_order = "mixed"``: ``batch`` is ``{domain: batch}``).

    ``losses``: each task's unweighted loss (detached tensors on the device); ``weights``:
    what the weighting reports for this step (floats, or tensors it left on the device).
    Implements :class:`mtlkit.step_context.StepEngine` for the step's context.
    """

    def __init__(self, model: nn.Module, raw_model: nn.Module, tasks: Mapping[str, Task], weighting: Weighting,
                 optimizer: torch.optim.Optimizer, cfg: TrainingConfig, ctx: D.DistContext,
                 extra_batches: Any = None, precision: Precision | None = None) -> None:
        self.model, self.raw_model, self.tasks = model, raw_model, tasks
        self.precision = precision if precision is not None else Precision("fp32", ctx.device)
        self.weighting, self.optimizer, self.cfg, self.ctx = weighting, optimizer, cfg, ctx
        self.extra_batches = extra_batches
        self.gradient_level = weighting.requires_grads == "shared"
        self.target = getattr(weighting, "grad_target", "params") if self.gradient_level else "params"
        # a weighting with its own backward or on_step_end may run passes DDP's reducer does not follow
        self.custom = (type(weighting).backward is not Weighting.backward
                       or type(weighting).on_step_end is not Weighting.on_step_end)
        self._split: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        self._draws = 0
        self._manual = self._mixed = False
        # the tasks of the step that took part, when the step asked (grad_step.present_tasks)
        self.present: list[str] | None = None
        # the weights of the last step when it left tasks out (grad_step.reported_weights), else None
        self.subset_weights: dict[str, float] | None = None
        self._global: tuple[StepContext, dict[str, Tensor]] | None = None  # (ctx, its global losses)
        self.early_presence = None  # the step's presence flags on their way to the host

    def __call__(self, batch: Any, domain: str | tuple[str, ...] | None, epoch: int = 0,
                 step: int = 0) -> tuple[dict[str, Tensor], dict]:
        mixed = isinstance(domain, tuple)
        if self.cfg.compile and self.cfg.compile_mode in CUDA_GRAPH_MODES:
            # a new step: the CUDA graphs may overwrite the last step's outputs (copied by now)
            torch.compiler.cudagraph_mark_step_begin()
        manual = self.ctx.enabled and (self.gradient_level or self.custom or mixed)
        with self.model.no_sync() if manual else contextlib.nullcontext():
            cut = _Cut() if self.target == "features" else None
            raw, outputs = self._losses(batch, domain, cut)
            if cut is not None and cut.leaves is None:
                raise TrainingError(f"model: {type(self.raw_model).__name__} declares a representation but did "
                                    f"not call its representation hook")
            values = {t: v.detach() for t, v in raw.items()}
            losses = self._domain_weighted(raw)
            shared, private = self.shared_and_private()
            ctx = StepContext(
                losses=losses, task_names=[t for t in self.weighting.task_names if t in losses], outputs=outputs,
                model=self.model, raw_model=self.raw_model, shared_params=shared, private_params=private,
                representation=cut.leaves if cut else None, batch=batch,
                domains=list(domain) if mixed else ([domain] if domain is not None else None),
                optimizer=self.optimizer, step=step, epoch=epoch, dist=self.ctx, grad_target=self.target,
                engine=self, representation_sources=cut.sources if cut else None)
            self._manual, self._mixed = manual, mixed
            self._draws = 0
            self.overflow = None  # fp16: whether this step's per-task gradients overflowed (grad_step)
            self.optimizer.zero_grad(set_to_none=True)
            self.present = self.subset_weights = None
            # which tasks take part, for the methods that may ask: copied to the host now,
            # collected while the device runs the backward passes (grad_step.present_tasks)
            asks = self.gradient_level or self.custom or self.weighting.present_only
            self.early_presence = grad_step.start_presence(ctx) if asks and ctx.task_names else None
            self.weighting.backward(ctx)
            if manual:
                self._average_rest(ctx)
            self.precision.step(self.optimizer)
            self.weighting.on_step_end(ctx)
        # a step that left tasks out reports them at 0 (see grad_step.reported_weights)
        weights = grad_step.reported_weights(self)
        if self.present is not None and self.present != list(self.weighting.task_names):
            self.subset_weights = weights
        return values, dict(weights)

    # -- forward ------------------------------------------------------------------------------
    def _losses(self, batch: Any, domain: Any, cut: _Cut | None = None) -> tuple[dict[str, Tensor], dict]:
        """Unweighted task losses and outputs of one batch (mixed: of each domain's batch)."""
        parts = batch.items() if isinstance(domain, tuple) else [(domain, batch)]
        losses, outputs = {}, {}
        for d, b in parts:
            with self.precision.autocast():
                out = forward(self.model, b, d, self.tasks, self.ctx.device, "train_data", cut,
                              self.cfg.channels_last)
            out = outputs_fp32(out)
            names = [d] if d is not None else list(self.tasks)
            tgt = targets(b, names, self.tasks, self.ctx.device, "train_data")
            losses.update({t: self.tasks[t].loss(out[t], tgt[t]) for t in names})
            outputs.update(out)
        return losses, outputs

    def _domain_weighted(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.cfg.domain_loss_weight:
            return losses
        return {t: v * self.cfg.domain_loss_weight[t] if self.cfg.domain_loss_weight.get(t, 1.0) != 1.0 else v
                for t, v in losses.items()}

    # -- parameters and DDP ------------------------------------------------------------------
    def shared_and_private(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Trainable (shared, private) parameters by the one rule (contracts.split_parameters),
        taken once: the trainable set is fixed for the optimiser's lifetime."""
        if self._split is None:
            shared, _ = split_parameters(self.raw_model)
            shared = [p for p in shared if p.requires_grad]
            shared_ids = {id(p) for p in shared}
            private = [p for p in self.raw_model.parameters() if p.requires_grad and id(p) not in shared_ids]
            self._split = shared, private
        if self.gradient_level and not self._split[0]:
            raise ConfigError("weighting: gradient-level weighting needs shared parameters, the model has none")
        return self._split

    def _average_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients DDP does not see (one flat all-reduce)."""
        if not self.ctx.enabled or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        D.all_reduce_mean_(flat, self.ctx)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _average_rest(self, ctx: StepContext) -> None:
        """After a manual-sync backward: average every gradient that is not global yet."""
        params = list(self.raw_model.parameters()) + list(self.weighting.parameters())
        seen: set[int] = set()
        todo = []
        for p in params:
            if p.grad is not None and id(p) not in ctx.global_grads and id(p) not in seen:
                seen.add(id(p))
                todo.append(p)
        self._average_grads(todo)

    # -- the StepEngine behind StepContext -----------------------------------------------------
    def backward_loss(self, ctx: StepContext, loss: Tensor) -> None:
        self.precision.scale(loss).backward()
        if not self._manual:  # DDP averaged the model's gradients; the weighting's are ours
            self._average_grads([p for p in self.weighting.parameters() if p.grad is not None])

    def task_gradients(self, ctx: StepContext, target: str, private_weights: Any, retain_graph: bool) -> Tensor:
        return grad_step.task_gradients(ctx, target, private_weights, retain_graph)

    def global_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        if self._global is None or self._global[0] is not ctx:  # one all-reduce per step
            self._global = (ctx, grad_step.global_losses(ctx))
        return self._global[1]

    def present_tasks(self, ctx: StepContext, losses: dict[str, Tensor] | None) -> list[str]:
        return grad_step.present_tasks(self, ctx, losses)

    def set_gradient(self, ctx: StepContext, combined: Tensor | None, target: str) -> None:
        grad_step.set_gradient(ctx, combined, target)

    def backward_gradients(self, ctx: StepContext, combine_grads: CombineGrads, target: str) -> None:
        grad_step.backward_gradients(self, ctx, combine_grads, target)

    def draw_batch(self, ctx: StepContext, split: str) -> Any:
        if self.extra_batches is None:
            raise TrainingError("weighting: this trainer has no data to draw an extra batch from")
        self._draws += 1
        return self.extra_batches.draw(split, ctx.domains, self._mixed, ctx.epoch, ctx.step, self._draws - 1)

    def losses_on(self, ctx: StepContext, batch: Any) -> dict[str, Tensor]:
        domain: Any = tuple(ctx.domains) if self._mixed else (ctx.domains[0] if ctx.domains else None)
        return self._domain_weighted(self._losses(batch, domain)[0])
