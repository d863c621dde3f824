"""Evaluation over whole splits, Delta_m against single-task baselines, the best checkpoint's
metric.

Under torchrun each rank evaluates indices rank, rank + world, ... (no padding, no sample
twice) and every task's metric state (sum-reducible tensors) is summed across ranks
before ``compute``. The states accumulate on the device: the evaluation's one wait for it
is the copy of the summed states to the host after the last batch. Many-to-many models
whose BatchNorm layers are shared by several domains are evaluated with each domain's own
statistics (:mod:`.bn_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..contracts import MetricState, Task
from ..errors import ConfigError
from . import distributed as D
from .bn_stats import domain_bn_layers, domain_statistics
from .config import TrainingConfig
from .precision import autocast, outputs_fp32
from .sampling import Seeds, Stream, batch_size, loader_batches
from .step import forward, targets


def evaluate(model: nn.Module, tasks: Mapping[str, Task], data, cfg: TrainingConfig,
             ctx: D.DistContext, train_data=None) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` (unwrapped: no DDP) over the whole of ``data``: {task: {metric: value}}.

    ``train_data`` (many-to-many: domain -> training set): where shared BatchNorm layers get
    each domain's statistics from before it is evaluated (see :mod:`.bn_stats`)."""
    was_training = model.training
    D.broadcast_buffers(model, ctx)  # rank 0's running statistics everywhere
    model.eval()
    if isinstance(data, Mapping):
        for d in data:
            if d not in tasks:
                raise ConfigError(f"evaluation data: domain '{d}' is not a task")
        items = [(d, ds, [d]) for d, ds in data.items()]
    else:
        items = [(None, data, list(tasks))]
    results: dict[str, dict[str, float]] = {}
    bns = domain_bn_layers(model, cfg, train_data) if isinstance(data, Mapping) else []
    try:
        for domain, ds, names in items:
            own = train_data.get(domain) if bns else None  # bns: train_data is a dict of domains
            shard = list(range(ctx.rank, len(ds), ctx.world_size))
            states = {t: tasks[t].metrics() for t in names}
            with domain_statistics(model, bns, domain, own, tasks, cfg, ctx), torch.no_grad(), \
                    loader_batches(Subset(ds, shard), cfg, ctx.device, Seeds(cfg.seed).for_(Stream.EVAL_LOADER),
                                   batch_size=batch_size(cfg, domain), shuffle=False) as batches:
                for batch in batches:
                    with autocast(cfg.precision, ctx.device):  # the training precision
                        out = forward(model, batch, domain, tasks, ctx.device, "evaluation data",
                                      channels_last=cfg.channels_last)
                    out = outputs_fp32(out)
                    tgt = targets(batch, names, tasks, ctx.device, "evaluation data")
                    for t in names:
                        states[t].update(out[t], tgt[t])
                summed_on_host(states, ctx)
                for t in names:
                    results[t] = {k: float(v) for k, v in states[t].compute().items()}
    finally:
        model.train(was_training)
    return results


def summed_on_host(states: Mapping[str, MetricState], ctx: D.DistContext) -> None:
    """Replace every state tensor by its sum over ranks, on the host. The tensors travel
    flattened together, one all-reduce and one copy to the host per dtype (in practice one:
    float64): the evaluation's only wait for the device, whatever the number of batches."""
    groups: dict[torch.dtype, list[tuple[MetricState, str]]] = {}
    for _, st in sorted(states.items()):  # the same order on every rank
        for key in sorted(st.state):
            groups.setdefault(st.state[key].dtype, []).append((st, key))
    for slots in groups.values():
        device = slots[0][0].state[slots[0][1]].device
        flat = torch.cat([st.state[k].detach().reshape(-1).to(device) for st, k in slots])
        flat, offset = D.all_reduce_sum(flat, ctx).cpu(), 0
        for st, k in slots:
            shape, size = st.state[k].shape, st.state[k].numel()
            st.state[k] = flat[offset:offset + size].view(shape)
            offset += size


def delta_m(tasks: Mapping[str, Task], baselines: Mapping[str, Mapping[str, float]],
            metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Delta_m% of ``metrics`` against ``baselines`` (their metrics, all tasks)."""
    from ..delta_m import delta_m as compute

    directions = {t: dict(tasks[t].metrics().higher_is_better) for t in baselines}
    return float(compute(metrics, baselines, directions))


def improved_best(best: dict[str, Any] | None, best_metric: str | None, higher: bool | None,
                  metrics: dict[str, dict[str, float]], epoch: int, global_step: int) -> dict[str, Any] | None:
    """The new best record if ``metrics`` beat ``best`` by ``best_metric`` ("task/metric"), else None."""
    if best_metric is None:
        return None
    task, name = best_metric.split("/")
    if name not in metrics.get(task, {}):
        raise ConfigError(f"training.best_metric: evaluation of task '{task}' gave no metric '{name}'")
    value = metrics[task][name]
    if not math.isfinite(value):
        return None
    if best is not None and not (value > best["value"] if higher else value < best["value"]):
        return None
    return {"metric": best_metric, "value": value, "epoch": epoch, "global_step": global_step}
