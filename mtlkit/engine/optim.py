"""The optimiser and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, weighting: nn.Module,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """Group 0: the model's trainable parameters; group 1 (if any): the weighting's.
    ``capturable``: Adam/AdamW keep their step counts on the device, as a CUDA graph of
    the training step needs (fused optimisers do so already)."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    wparams = [p for p in weighting.parameters() if p.requires_grad]
    if wparams:  # weighting parameters (log-variances...) are not weights to shrink
        groups.append({"params": wparams, "weight_decay": 0.0})
    fused = {"fused": True} if cfg.fused else {}  # else torch's own default
    if cfg.name == "sgd":  # no step count to keep
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    on_device = fused or ({"capturable": True} if capturable else {})
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **on_device)


def lr_factor(cfg: ScheduleConfig, epochs: int, epoch: int) -> float:
    """The schedule as a pure function of the epoch (exact on resume)."""
    if cfg.name == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def apply_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for g, base in zip(optimizer.param_groups, base_lrs):
        g["lr"] = base * factor
