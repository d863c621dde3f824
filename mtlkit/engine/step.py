"""One training step: forward, task losses, the loss-level or gradient-level backward (with
the DDP averaging DDP itself does not do), the optimiser step.

Nothing here reads a value back from the device, with one exception: gradient-level
weightings need to know which tasks have a gradient at all (see ``_combine_present``), one
K-vector per step. The step's losses and weights go back to the caller as tensors, to be
read once per log interval (:mod:`.readout`).

Distributed (torchrun)
----------------------
The model is wrapped in DistributedDataParallel by the trainer. Parameters of the
weighting (outside DDP) get their gradients averaged by hand. Gradient-level weightings
run the forward under ``model.no_sync()`` and compute every gradient with
``torch.autograd.grad`` (no DDP reducer involved); the K x P per-task gradient matrix, the
task losses and the task-specific gradients are averaged across ranks by all-reduce before
``combine_grads``, so every rank's weighting sees the same values and applies the same
update. Tasks with no valid target in the batch (a zero gradient row) are left out of
``combine_grads``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..contracts import Task, Weighting, split_parameters
from ..errors import ConfigError, TrainingError
from . import distributed as D
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
            device: torch.device, where: str, channels_last: bool = False) -> dict[str, Tensor]:
    if "image" not in batch:
        raise missing_key(where, "image", have=batch)
    x = batch["image"].to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    out = model(x, tasks=[domain]) if domain is not None else model(x)
    for t in [domain] if domain is not None else list(tasks):
        if t not in out:
            raise TrainingError(f"the model returned no output for task '{t}'")
    return out


class TrainStep:
    """``step(batch, domain) -> (losses, weights)``: one update of model and weighting.

    ``losses``: each task's unweighted loss (detached tensors on the device); ``weights``:
    what the weighting reports for this step (floats, or tensors it left on the device).
    """

    def __init__(self, model: nn.Module, raw_model: nn.Module, tasks: Mapping[str, Task], weighting: Weighting,
                 optimizer: torch.optim.Optimizer, cfg: TrainingConfig, ctx: D.DistContext,
                 precision: Precision | None = None) -> None:
        self.model, self.raw_model, self.tasks = model, raw_model, tasks
        self.weighting, self.optimizer, self.cfg, self.ctx = weighting, optimizer, cfg, ctx
        self.precision = precision if precision is not None else Precision("fp32", ctx.device)
        self.gradient_level = weighting.requires_grads == "shared"
        self._split: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        # the weights of the last step when it left tasks out (see _combine_present), else None
        self.subset_weights: dict[str, float] | None = None

    def __call__(self, batch: dict, domain: str | None) -> tuple[dict[str, Tensor], dict]:
        names = [domain] if domain is not None else list(self.tasks)
        no_sync = self.gradient_level and self.ctx.enabled
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self.precision.autocast():
                out = forward(self.model, batch, domain, self.tasks, self.ctx.device, "train_data",
                              self.cfg.channels_last)
            out = outputs_fp32(out)
            tgt = targets(batch, names, self.tasks, self.ctx.device, "train_data")
            losses = {t: self.tasks[t].loss(out[t], tgt[t]) for t in names}
            values = {t: losses[t].detach() for t in names}
            if domain is not None:
                wt = self.cfg.domain_loss_weight.get(domain, 1.0)
                losses = {domain: losses[domain] * wt} if wt != 1.0 else losses
            self.optimizer.zero_grad(set_to_none=True)
            self.subset_weights = None
            if self.gradient_level:
                self._gradient_level_backward(losses)
            else:
                self.precision.scale(self.weighting.combine(losses)).backward()
                self._average_grads([p for p in self.weighting.parameters() if p.grad is not None])
            self.precision.step(self.optimizer)
        # a gradient-level step that left tasks out reports them at 0 (see _combine_present)
        weights = self.subset_weights if self.subset_weights is not None else self.weighting.weights()
        return values, dict(weights)

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

    def _shared_and_private(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Trainable (shared, private) parameters by the one rule (contracts.split_parameters),
        taken once: the trainable set is fixed for the optimiser's lifetime."""
        if self._split is None:
            shared, _ = split_parameters(self.raw_model)
            shared = [p for p in shared if p.requires_grad]
            if not shared:
                raise ConfigError("weighting: gradient-level weighting needs shared parameters, the model has none")
            shared_ids = {id(p) for p in shared}
            private = [p for p in self.raw_model.parameters() if p.requires_grad and id(p) not in shared_ids]
            self._split = shared, private
        return self._split

    def _gradient_level_backward(self, losses: dict[str, Tensor]) -> None:
        """Shared parameters: ``combine_grads`` of the global batch; the rest: ``combine``.

        Everything the weighting reads is averaged across ranks first, the K x P gradient
        matrix and the K task losses alike: with a rank's own losses (MGDA's loss
        normalisation) the ranks would choose different weights and the replicas drift.
        """
        shared, private = self._shared_and_private()
        names = list(self.weighting.task_names)
        scale = self.precision.scale_factor()  # fp16: a device tensor, else None
        rows = []
        for t in names:
            loss = losses[t] if scale is None else losses[t] * scale
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for g, p in zip(grads, shared)]))
        G = torch.stack(rows)  # K x P, fp32 whatever the parameters' dtype
        D.all_reduce_mean_(G, self.ctx)
        overflow = None
        if scale is not None:
            # the weighting sees true gradients; an overflowed step gets non-finite gradients
            # below, so the scaler skips it and lowers the scale (no host read here)
            overflow = ~torch.isfinite(G).all()
            G = torch.nan_to_num(G / scale, nan=0.0, posinf=0.0, neginf=0.0)
        # float64 carries any task's loss dtype exactly; each goes back to its own dtype
        mean = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in names])
        D.all_reduce_mean_(mean, self.ctx)
        global_losses = {t: mean[k].to(losses[t].dtype) for k, t in enumerate(names)}
        combined = self._combine_present(G, global_losses)
        if combined is not None and scale is not None:
            # the scaler's step unscales every gradient it owns: hand it the scaled aggregate
            combined = torch.where(overflow, torch.full_like(combined, float("inf")), combined * scale)
        offset = 0
        for p in shared:
            n = p.numel()
            # no task to learn from: no gradient, so the optimiser leaves the trunk alone
            # (a zero gradient would still move it by momentum and weight decay)
            p.grad = None if combined is None else combined[offset:offset + n].detach().view_as(p).clone()
            offset += n
        private = private + [p for p in self.weighting.parameters() if p.requires_grad]
        if private:
            grads = torch.autograd.grad(self.precision.scale(self.weighting.combine(losses)), private,
                                        allow_unused=True)
            used = []
            for p, g in zip(private, grads):
                if g is not None:
                    p.grad = g.detach().clone()
                    used.append(p)
            self._average_grads(used)

    def _combine_present(self, G: Tensor, losses: dict[str, Tensor]) -> Tensor | None:
        """``combine_grads`` over the tasks whose gradient row is not zero (None: no such task).

        A task with no valid target in the batch (every label ignored, every depth 0) has a
        zero loss and a zero row. Left in, it decides the aggregate: the min-norm point of
        a hull holding 0 is 0 (MGDA), IMTL-G puts all the weight on it; the trunk stops.
        Such tasks are left out and the weighting solves for the others: during the call
        its ``task_names`` lists the present tasks, in order, matching the rows of
        ``grads`` and the keys of ``losses`` (a weighting with per-task state can tell
        which tasks these are). G is all-reduced already, so every rank leaves out the same.
        Which tasks take part is decided on the host: the step's one read from the device.
        """
        # max |g| per row: a reduction, no K x P temporary; a NaN row stays in (NaN != 0)
        keep = (torch.linalg.vector_norm(G, ord=float("inf"), dim=1) != 0).tolist()
        if all(keep):
            combined = self.weighting.combine_grads(G, losses)
        else:
            full = self.weighting.task_names
            present = [t for t, k in zip(full, keep) if k]
            # what the log reports for this step (the weighting's own weights() would pair
            # the full task list with the present tasks' coefficients)
            self.subset_weights = dict.fromkeys(full, 0.0)
            if not present:
                return None
            self.weighting.task_names = present
            try:
                combined = self.weighting.combine_grads(G[torch.tensor(keep, device=G.device)],
                                                        {t: losses[t] for t in present})
                reported = self.weighting.weights()
            finally:
                self.weighting.task_names = full
            # {} is a method's way of saying it reports no weights
            self.subset_weights = {**self.subset_weights, **reported} if reported else {}
        if combined.shape != (G.shape[1],):
            raise TrainingError(f"weighting: combine_grads returned shape {tuple(combined.shape)}, "
                                f"expected ({G.shape[1]},)")
        return combined
