"""Attention masks read out of a model: for ``mtlkit plot --attention`` (drawn with
matplotlib in :mod:`mtlkit.plots`) and for loggers at each evaluation (as arrays here, with
torch alone, so that a training process never imports matplotlib)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError


def first_samples(data, n: int) -> tuple[str | None, dict[str, torch.Tensor]]:
    """``(domain, batch)`` of the first ``n`` samples of ``data`` (many-to-many: of its first domain)."""
    if isinstance(data, dict):
        domain, data = next(iter(data.items()))
    else:
        domain = None
    n = min(n, len(data))
    samples = [data[i] for i in range(n)]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
    return domain, batch


def has_attention_masks(model: nn.Module) -> bool:
    """Whether ``model`` has task-specific modules holding sigmoid attention masks."""
    owners = getattr(model, "task_specific", None)
    return isinstance(owners, nn.ModuleDict) and any(
        isinstance(m, nn.Sigmoid) for owner in owners.values() for m in owner.modules())


def capture_attention_masks(model: nn.Module, x: torch.Tensor, tasks: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each task's attention masks (the outputs of its Sigmoid layers), in execution order."""
    owners = getattr(model, "task_specific", None)
    if not isinstance(owners, nn.ModuleDict):
        raise CheckpointError("this model has no task-specific attention modules (use an mtan recipe)")
    masks: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    handles = []
    for t in tasks:
        if t not in owners:
            continue
        for m in owners[t].modules():
            if isinstance(m, nn.Sigmoid):
                handles.append(m.register_forward_hook(lambda mod, inp, out, t=t: masks[t].append(out.detach())))
    try:
        with torch.no_grad():
            model(x, tasks=tasks)
    finally:
        for h in handles:
            h.remove()
    if not any(masks.values()):
        raise CheckpointError("this model's task-specific modules have no sigmoid attention masks")
    return masks


def _strip(images: list[np.ndarray]) -> np.ndarray:
    """Images of one size side by side, a one-pixel white gap between them."""
    gap = np.ones((images[0].shape[0], 1, *images[0].shape[2:]), dtype=np.float32)
    parts = []
    for i, im in enumerate(images):
        parts += [gap, im] if i else [im]
    return np.concatenate(parts, axis=1)


def attention_images(model: nn.Module, data, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of ``data`` and every task's attention mask at every level,
    as images: ``{"attention/input": H x W' x 3, "attention/TASK/level_L": h x w'}`` (the
    samples side by side; a mask is its channel mean, values in [0, 1]). Empty for a model
    without attention masks. The model runs in eval mode without gradients, on its own
    device (reading samples may draw from the global RNGs: a caller inside training
    restores them)."""
    if not has_attention_masks(model) or data is None:
        return {}
    was_training = model.training
    try:
        model.eval()
        domain, batch = first_samples(data, n)
        tasks = [domain] if domain else [t for t in model.task_specific]
        device = next(model.parameters()).device
        x = batch["image"].to(device)
        masks = capture_attention_masks(model, x, tasks)
    finally:
        model.train(was_training)
    shown = x[:, :3].float().cpu()
    lo, hi = shown.amin(dim=(1, 2, 3), keepdim=True), shown.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((shown - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).numpy()
    if shown.shape[-1] == 1:
        shown = np.repeat(shown, 3, axis=-1)
    out = {"attention/input": _strip(list(shown))}
    for t, levels in masks.items():
        for lv, mask in enumerate(levels):
            if mask.dim() == 4:  # B x C x h x w
                out[f"attention/{t}/level_{lv}"] = _strip(list(mask.float().mean(1).cpu().numpy()))
    return out
