"""Numeric precision and execution settings of training: autocast, loss scaling, compile,
memory format, determinism and the loader's worker count.

``training.precision``:
  - ``fp32``: no autocast (torch's defaults, e.g. cuDNN may use TF32 for convolutions).
  - ``bf16``: the forward pass under ``torch.autocast(dtype=torch.bfloat16)``; bf16 has fp32's
    exponent range, so no loss scaling.
  - ``fp16``: autocast in float16 plus a ``torch.amp.GradScaler``: each backward runs on the
    scaled loss; the optimiser step unscales, skips steps whose gradients overflowed and
    adapts the scale. The scaler's state goes into checkpoints (``scaler`` in the metadata).

Losses are always computed in fp32 (the outputs are cast up before ``Task.loss``), and
gradient-level weightings receive fp32 gradients (the parameters are fp32; the solvers take
their Gram matrices in float64).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .config import TrainingConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(name: str, device: torch.device, cache: bool = True):
    """The forward pass's context for ``training.precision`` = ``name`` (``cache``: keep
    each weight's cast for the region; off while a CUDA graph is captured)."""
    if name not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[name], cache_enabled=cache)


class Precision:
    """Autocast and (fp16) loss scaling for one trainer."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.dtype = DTYPES.get(name)
        if name == "fp16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
            raise ConfigError("training.precision: fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3)")
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self.autocast_cache = True  # off while a CUDA graph is captured (graph_step)

    def autocast(self):
        return autocast(self.name, self.device, self.autocast_cache)

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to backpropagate (scaled under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def scale_factor(self) -> Tensor | None:
        """The current loss scale as a device tensor (no host read); None without scaling."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (under fp16: unscale, skip on overflow, update the scale)."""
        if self.scaler is None:
            optimizer.step()
            return
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            return  # a step with no gradient (no task had a target): nothing to unscale or check
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, Any] | None:
        """JSON state for checkpoints (reads the scale: only at checkpoint time)."""
        if self.scaler is None:
            return None
        return dict(self.scaler.state_dict())

    def load_state(self, state: dict[str, Any] | None, where: str) -> None:
        if self.scaler is None:
            return
        if not state:
            raise ConfigError(f"{where}: the checkpoint has no loss-scaler state (it was not trained with "
                              f"training.precision = \"fp16\")")
        self.scaler.load_state_dict(dict(state))


def outputs_fp32(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model outputs for the losses: autocast leaves some in bf16/fp16; losses run in fp32."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32 and
                v.dtype != torch.float64 else v) for k, v in out.items()}


def resolve(cfg: TrainingConfig, device: torch.device) -> TrainingConfig:
    """``cfg`` with its "auto" settings decided for ``device``: ``precision`` bf16 on a CUDA
    device with bf16 support (on an H200 it halved MTAN's peak memory at an equal or shorter
    step), else fp32 (CPUs without bf16 units run it slower); ``compile`` and
    ``channels_last`` on CUDA only (on CPUs inductor's compile takes minutes, and channels-last
    3x3 convolution backward was slower on the CPUs measured); the loader's worker count."""
    update: dict[str, Any] = {}
    if cfg.precision == "auto":
        update["precision"] = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    for name in ("compile", "channels_last"):
        if getattr(cfg, name) == "auto":
            update[name] = device.type == "cuda"
    if cfg.num_workers is None:
        update["num_workers"] = loader_workers(None, device)
    return cfg.model_copy(update=update) if update else cfg


def prepare_model(raw_model: nn.Module, cfg: TrainingConfig, device: torch.device) -> None:
    """Memory format and determinism switches (in place, before the optimiser is built)."""
    if cfg.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic kernel (torch lists them) warns and runs
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels


def compiled(model: nn.Module, cfg: TrainingConfig) -> nn.Module:
    """``torch.compile(model)`` when ``training.compile`` is on (else ``model``), in
    ``training.compile_mode``."""
    if not cfg.compile:
        return model
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    try:
        return torch.compile(model, backend=cfg.compile_backend, mode=mode)
    except Exception as exc:  # an unknown backend, a platform without a compiler
        raise ConfigError(f"training.compile: torch.compile failed: {str(exc).splitlines()[0]}") from None


def loader_workers(requested: int | None, device: torch.device) -> int:
    """``training.num_workers``, or the default: 0 on the CPU; on CUDA min(8, CPUs - 1)
    with this process's CPUs shared among the node's ranks (LOCAL_WORLD_SIZE)."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local - 1))
