"""The whole training step replayed as one CUDA graph (``training.cuda_graph``).

At the batch sizes of the dense benchmarks (MTAN on SegNet, batch 2) a step is a few
thousand small kernels, and on a fast GPU the host cannot launch them as fast as the GPU
runs them: the step is bound by Python and the launches, not by arithmetic. A CUDA graph
records the step's kernels once (forward, losses, the weighting's backward, the optimiser
update) and replays them with one launch.

What a graph needs, and how this module provides it:

- the same kernels every step: a graph is captured per (domain, input shapes and dtypes,
  epoch, optimiser and its learning rates). A new epoch captures anew, so a weighting
  whose state changes between epochs (DWA's weights) and the schedule's learning rate are
  taken up; a batch of another shape (an epoch's last, smaller batch) runs eagerly;
- no host read inside the step, and no host-side state that changes from step to step:
  only weightings that declare ``graph_safe`` qualify, not under torchrun, fp16 (its loss
  scaler decides on the host), torch.compile in a mode that makes graphs of its own
  (``reduce-overhead``, ``max-autotune``: graphs inside a graph) or ``domain_order = "mixed"``.
  torch.compile without its own graphs (``default``, ``max-autotune-no-cudagraphs``) does
  qualify: inductor compiles during the eager warm-up steps, and its fused kernels are then
  captured like any others;
- fixed addresses: each batch is copied into the graph's own input tensors; the optimiser
  keeps its state on the device (``capturable``, set by the trainer);
- warm-up: the first ``WARMUP`` steps of each graph's key run eagerly on a side stream
  (cuDNN's autotuning, the optimiser's lazily made state), then the step is captured and
  replayed.

A step replayed from a graph returns fresh copies of its losses (the graph's own outputs
are overwritten by the next replay).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..contracts import Weighting
from ..errors import ConfigError, TrainingError
from .step import CUDA_GRAPH_MODES

WARMUP = 2  # eager steps per graph key before its capture


def graph_obstacle(cfg: Any, weighting: Weighting, device: torch.device, distributed: bool,
                   many_to_many: bool) -> str | None:
    """Why the training step cannot run as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device (training runs on {device.type})"
    if distributed:
        return "it is not supported under torchrun (DDP's gradient buckets run outside the graph)"
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
        return (f"training.compile_mode = \"{cfg.compile_mode}\" replays torch.compile's own CUDA graphs "
                f"(use compile_mode = \"default\" for compiled kernels inside the step's graph)")
    if cfg.precision == "fp16":
        return "fp16's loss scaler decides on the host whether a step is skipped (use bf16)"
    if many_to_many and cfg.domain_order == "mixed":
        return "domain_order = \"mixed\" draws a batch of another domain set every step"
    if not type(weighting).graph_safe:
        return (f"weighting {type(weighting).__name__} is not graph-safe (it reads values back or changes "
                f"host-side state from step to step)")
    return None


def wants_graphs(cfg: Any, weighting: Weighting, device: torch.device, distributed: bool,
                 many_to_many: bool) -> bool:
    """Whether the trainer replays its steps as CUDA graphs. ``cuda_graph = "on"`` where it
    cannot: a one-line ConfigError saying why; ``"auto"``: graphs where they can run."""
    if cfg.cuda_graph == "off":
        return False
    reason = graph_obstacle(cfg, weighting, device, distributed, many_to_many)
    if reason is not None and cfg.cuda_graph == "on":
        raise ConfigError(f"training.cuda_graph = \"on\": {reason}")
    return reason is None


class _Graph:
    """One captured step: its input tensors, the graph and the step's outputs."""

    def __init__(self, inputs: dict[str, Tensor], graph: Any, outputs: tuple) -> None:
        self.inputs, self.graph, self.outputs = inputs, graph, outputs


class CudaGraphs:
    """The CUDA calls of :class:`GraphedStep` (the CPU tests put a recorder in their place)."""

    def warm(self, run: Callable[[], Any]) -> Any:
        # warm-up away from the default stream, as CUDA graph capture requires of the
        # lazily initialised state (cuBLAS workspaces, cuDNN's chosen algorithms)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = run()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        """(graph, outputs): ``run`` recorded, not executed; ``graph.replay()`` executes it."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = run()
        return graph, outputs


class GraphedStep:
    """Wraps a :class:`~mtlkit.engine.step.TrainStep`: same call, same results, each step
    replayed from a CUDA graph once its key is warm (see the module's docstring)."""

    def __init__(self, step: Any, fallback_on_error: bool = False, backend: Any = None) -> None:
        self.step = step
        self.backend = backend if backend is not None else CudaGraphs()
        self.fallback_on_error = fallback_on_error  # cuda_graph = "auto": a failed capture runs eagerly
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.epoch: int | None = None
        self.disabled = False
        self.captures = self.replays = 0  # counts, for tests and the bench

    # the trainer and the stages reach the wrapped step's state through these
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer) -> None:
        self.step.optimizer = value

    @property
    def subset_weights(self) -> dict[str, float] | None:
        return self.step.subset_weights

    def __call__(self, batch: Any, domain: Any, epoch: int = 0, step: int = 0) -> tuple[dict[str, Tensor], dict]:
        key = None if self.disabled else self._key(batch, domain, epoch)
        if key is None:
            return self.step(batch, domain, epoch, step)
        if epoch != self.epoch:  # a new epoch: the last one's graphs (and their memory) go
            self._drop()
            self.epoch = epoch
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= WARMUP:
                with self._no_autocast_cache():
                    return self.backend.warm(lambda: self.step(batch, domain, epoch, step))
            graph = self._capture(key, batch, domain, epoch, step)
            if graph is None:  # "auto" and the capture failed: eager from now on
                return self.step(batch, domain, epoch, step)
        for name, t in graph.inputs.items():
            t.copy_(batch[name], non_blocking=True)
        graph.graph.replay()
        self.replays += 1
        values, weights = graph.outputs
        return ({t: v.clone() for t, v in values.items()},
                {k: v.clone() if isinstance(v, Tensor) else v for k, v in weights.items()})

    # -- internals ---------------------------------------------------------------------------
    def _key(self, batch: Any, domain: Any, epoch: int) -> tuple | None:
        if not isinstance(batch, Mapping) or isinstance(domain, tuple):
            return None
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, Tensor))
        opt = self.step.optimizer
        lrs = tuple(float(g["lr"]) for g in opt.param_groups)
        return domain, shapes, epoch, id(opt), lrs

    def _capture(self, key: tuple, batch: Mapping, domain: Any, epoch: int, step: int) -> _Graph | None:
        device = self.step.ctx.device
        # the graph's own inputs: each replay (this step's first) copies its batch into them
        inputs = {k: torch.empty_like(v, device=device) for k, v in batch.items() if isinstance(v, Tensor)}
        static = {**batch, **inputs}
        # the gradients are made inside the graph, in its memory pool
        self.step.optimizer.zero_grad(set_to_none=True)
        try:
            with self._no_autocast_cache():
                graph, outputs = self.backend.capture(lambda: self.step(static, domain, epoch, step), device)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not self.fallback_on_error:
                raise TrainingError(f"training.cuda_graph: capturing the training step failed: {message} "
                                    f"(training.cuda_graph = \"off\" trains without graphs)") from None
            warnings.warn(f"training.cuda_graph = \"auto\": capturing the training step failed ({message}); "
                          f"training goes on without CUDA graphs", stacklevel=2)
            self.disabled = True
            self.step.optimizer.zero_grad(set_to_none=True)
            return None
        self.captures += 1
        self.graphs[key] = _Graph(inputs, graph, outputs)
        return self.graphs[key]

    @contextlib.contextmanager
    def _no_autocast_cache(self):
        """Autocast's cache of cast weights off for warm-up and capture alike: cached casts must
        not outlive a capture, and a compiled network sees the same autocast state in both
        (no recompilation inside the capture)."""
        self.step.precision.autocast_cache = False
        try:
            yield
        finally:
            self.step.precision.autocast_cache = True

    def _drop(self) -> None:
        if self.graphs:
            # the gradients live in the graphs' memory pools: let the pools go with them
            self.step.optimizer.zero_grad(set_to_none=True)
            self.graphs.clear()
        self.seen.clear()
