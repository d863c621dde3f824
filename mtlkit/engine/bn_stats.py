"""Per-domain BatchNorm statistics at evaluation (many-to-many).

A BatchNorm layer that several domains share keeps one set of running statistics, a mix
of every domain's, which fits none of them when the domains' images differ (the
Decathlon's omniglot: mostly white; svhn: mid grey). The reference protocol therefore
recomputes the shared layers' statistics on each domain before testing it. Here:

1. the shared BatchNorm layers (:func:`shared_batchnorms`) forget their statistics and
   switch to a cumulative average (``momentum = None``);
2. one pass over the domain's training data, with those layers in train mode and every
   other module in eval mode (domain-specific BatchNorm keeps its own statistics, no
   dropout), under ``no_grad``: no weight changes;
3. under torchrun each rank passes over its shard (indices rank, rank + world, ...) and
   the ranks' averages are combined, weighted by their batch counts, so every rank holds
   the same statistics (those of one pass over the whole domain, batch by batch);
4. the domain is evaluated; then the training statistics, momentum and train/eval modes
   come back exactly as they were, and so do the global RNG states: training continues
   as if nothing had happened (exact resume keeps holding).

Which layers are shared is the one rule of :func:`mtlkit.contracts.module_owners`: a
BatchNorm outside every task container (``heads``, ``task_specific``, a
:class:`~mtlkit.domains.DomainSpecific` copy) is shared. Layers that
:func:`mtlkit.domains.freeze_shared` froze (the "feature" baseline) keep their statistics:
they belong to the fixed extractor. A model with one domain shares nothing across
domains, so nothing is recomputed. ``training.domain_bn_stats = false`` turns it off.

The pass draws its samples' augmentation from its own seed stream
(:attr:`~mtlkit.engine.sampling.Stream.BN_STATS`), one per domain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..contracts import Task, module_owners
from ..errors import DataError
from . import distributed as D
from .checkpoint import capture_rng, rng_to_json, set_rng_state
from .config import TrainingConfig
from .precision import autocast
from .sampling import SeededSamples, Seeds, Stream, batch_size, chunks, loader_batches
from .step import forward


def shared_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers with running statistics that no task owns and that are not frozen."""
    owners = module_owners(model)
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and id(m) not in owners and not getattr(m, "_mtlkit_frozen_stats", False)]


def domain_bn_layers(model: nn.Module, cfg: TrainingConfig, train_data: Any) -> list[_BatchNorm]:
    """The layers to recompute per domain: none unless ``training.domain_bn_stats`` is on and
    the training data has several domains."""
    if not cfg.domain_bn_stats or not isinstance(train_data, Mapping) or len(train_data) < 2:
        return []
    return shared_batchnorms(model)


def _pass(model: nn.Module, bns: list[_BatchNorm], domain: str, data, tasks: Mapping[str, Task],
          cfg: TrainingConfig, ctx: D.DistContext) -> None:
    """One pass over this rank's shard of ``data`` through ``domain``'s branch, counting
    batches into the (reset, cumulative) statistics of ``bns``."""
    index = list(tasks).index(domain) if domain in tasks else 0
    seeds = Seeds(cfg.seed)
    shard = list(range(ctx.rank, len(data), ctx.world_size))
    rng = seeds.generator(Stream.BN_STATS, index)
    sample_seeds = rng.integers(0, 2**62, size=len(data)).tolist()  # one per sample, whatever the world size
    batches = [[(i, sample_seeds[i]) for i in b] for b in chunks(shard, batch_size(cfg, domain), False)]
    with torch.no_grad(), loader_batches(SeededSamples(data), cfg, ctx.device, seeds.for_(Stream.BN_STATS, index),
                                         batch_sampler=batches) as loaded:
        for batch in loaded:
            with autocast(cfg.precision, ctx.device):  # as the domain is then evaluated
                forward(model, batch, domain, tasks, ctx.device, f"training data of domain '{domain}'",
                        channels_last=cfg.channels_last)
    # the ranks' cumulative averages, weighted by how many batches each counted
    rows = []
    for bn in bns:
        n = bn.num_batches_tracked.to(torch.float64)
        rows.append(torch.cat([n * bn.running_mean.to(torch.float64), n * bn.running_var.to(torch.float64), n[None]]))
    if ctx.enabled:
        flat = D.all_reduce_sum(torch.cat(rows), ctx)
        rows, offset = [], 0
        for bn in bns:
            size = 2 * bn.running_mean.numel() + 1
            rows.append(flat[offset:offset + size])
            offset += size
    totals = torch.stack([row[-1] for row in rows]).tolist()  # the pass's one read, after its last batch
    for bn, row, total in zip(bns, rows, totals):
        c = bn.running_mean.numel()
        if total == 0:
            raise DataError(f"domain '{domain}': no training batch reached a shared BatchNorm layer, so its "
                            f"statistics cannot be recomputed (training.domain_bn_stats = false turns this off)")
        bn.running_mean.copy_((row[:c] / total).to(bn.running_mean.dtype))
        bn.running_var.copy_((row[c:2 * c] / total).to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(int(round(total)))


@contextlib.contextmanager
def domain_statistics(model: nn.Module, bns: list[_BatchNorm], domain: str, data, tasks: Mapping[str, Task],
                      cfg: TrainingConfig, ctx: D.DistContext) -> Iterator[None]:
    """Within the block, ``bns`` hold ``domain``'s statistics (computed on ``data``) and the
    model is in eval mode; on exit everything is as before (see the module docstring)."""
    if not bns or data is None:
        yield
        return
    saved = [(bn, {k: v.clone() for k, v in bn.named_buffers(recurse=False)}, bn.momentum) for bn in bns]
    modes = [(m, m.training) for m in model.modules()]
    rng = capture_rng()
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        _pass(model, bns, domain, data, tasks, cfg, ctx)
        for bn, _, momentum in saved:
            bn.momentum = momentum
            bn.eval()
        yield
    finally:
        with torch.no_grad():
            for bn, buffers, momentum in saved:
                for k, v in buffers.items():
                    getattr(bn, k).copy_(v)
                bn.momentum = momentum
        for m, mode in modes:
            m.training = mode
        set_rng_state(rng_to_json(rng))
