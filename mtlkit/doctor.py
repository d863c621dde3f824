"""``mtlkit doctor``: what a bug report needs about this machine and this install, as a dict.

Versions, devices, threads, the CPU and its ISA flags, the registered plugins (and any
that failed to load), and a short speed probe: float32 GEMM GFLOP/s (the median of several
readings) and one 3x3 convolution forward and backward, on the CPU and on a CUDA device
if there is one. Every field is plain JSON.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

# distributions whose versions a report names (torch: the imported one)
PACKAGES = ("torch", "torchvision", "timm", "pluggy", "pydantic", "rich", "safetensors", "numpy", "tensorboard")
# /proc/cpuinfo flags that decide which kernels torch runs
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def versions() -> dict[str, str | None]:
    """Python, mtlkit and the packages it uses (None: not installed)."""
    import torch

    from . import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mtlkit": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__
    return out


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model, cores, ISA flags (from ``/proc/cpuinfo`` where there is one) and the
    vector capability torch's CPU kernels were dispatched to."""
    import torch

    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's fields
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "model": fields.get("model name") or fields.get("Model") or platform.processor() or None,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "flags": {f: f in flags for f in ISA_FLAGS} if flags else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def threads() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}


def devices() -> dict[str, Any]:
    """CUDA devices (name, memory, compute capability), whether MPS is there, and the
    distributed backends."""
    import torch

    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": cuda, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "mps": bool(mps is not None and mps.is_available()), "distributed": distributed_backends()}


def distributed_backends() -> dict[str, Any]:
    """Which torch.distributed backends this torch build has (torchrun uses gloo on CPUs,
    nccl on CUDA), and the NCCL version it was built with."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return {"gloo": False, "nccl": False, "nccl_version": None}
    nccl = dist.is_nccl_available()
    version = None
    if nccl:
        try:
            version = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):  # a build without NCCL's library
            pass
    return {"gloo": dist.is_gloo_available(), "nccl": nccl, "nccl_version": version}


def plugins(pm=None) -> dict[str, Any]:
    """Registered component names per kind, every plugin with its source, and the plugins
    that failed to load (an error building the registry is reported, not raised)."""
    from .errors import MtlkitError
    from .plugin_manager import get_plugin_manager
    from .registry import KINDS

    try:
        pm = pm or get_plugin_manager()
        registry = pm.registry
    except MtlkitError as exc:
        return {"components": {}, "loaded": {}, "failed": {}, "error": str(exc)}
    return {"components": {k: registry.names(k) for k in KINDS},
            "loaded": {name: pm.sources.get(name, "?") for name, _ in pm.pm.list_name_plugin()},
            "failed": dict(pm.failed_plugins), "error": None}


def _readings(run: Callable[[], None], sync: Callable[[], None], budget: float, readings: int,
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of ``run``, from up to ``readings`` readings (at least 3, fewer when
    one call takes longer than ``budget / readings``) that repeat it for about
    ``budget / readings`` seconds each, after a warm-up call."""
    run()
    sync()
    t0 = clock()
    run()
    sync()
    once = max(clock() - t0, 1e-9)
    readings = max(3, min(readings, int(budget / once)))
    reps = max(1, int(budget / readings / once))
    out = []
    for _ in range(readings):
        t0 = clock()
        for _ in range(reps):
            run()
        sync()
        out.append((clock() - t0) / reps)
    return out


def speed_probe(seconds: float = 5.0, device: str = "cpu", readings: int = 7, gemm_size: int | None = None,
                conv_batch: int = 8) -> dict[str, Any]:
    """GEMM and 3x3-conv throughput on ``device`` in about ``seconds`` (3:2 between them;
    each runs at least 5 times, so tiny sizes make a quick probe for tests).

    GEMM: float32 square matrices (``gemm_size``; default 1024 on the CPU, 4096 on a GPU),
    2 n^3 flops a product. Conv: 3x3, 64 -> 64 channels, stride 1, ``conv_batch`` images of
    56 x 56 (a ResNet stage), forward and backward (input and weight gradients: 3 x the
    forward's 2 * batch*56*56*64*64*9 flops). Reported: the median of the readings (up to
    ``readings`` of each), and the GEMM readings' range.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    n = gemm_size or (4096 if dev.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, generator=gen).to(dev) for _ in range(2))
    gemm_rates = sorted(2 * n**3 / t / 1e9 for t in _readings(lambda: torch.mm(a, b), sync, 0.6 * seconds, readings))

    x = torch.randn(conv_batch, 64, 56, 56, generator=gen).to(dev).requires_grad_()
    w = torch.randn(64, 64, 3, 3, generator=gen).to(dev).requires_grad_()

    def conv() -> None:
        F.conv2d(x, w, padding=1).sum().backward()

    conv_s = statistics.median(_readings(conv, sync, 0.4 * seconds, readings))
    conv_flops = 3 * 2 * conv_batch * 56 * 56 * 64 * 64 * 9
    return {"device": str(dev),
            "gemm_size": n, "gemm_gflops": statistics.median(gemm_rates),
            "gemm_gflops_range": [gemm_rates[0], gemm_rates[-1]],
            "conv_shape": f"{conv_batch}x64x56x56, 3x3, 64 out, forward+backward",
            "conv_ms": 1e3 * conv_s, "conv_gflops": conv_flops / conv_s / 1e9}


def doctor(probe_seconds: float | None = 5.0, pm=None, **probe: Any) -> dict[str, Any]:
    """The whole report. ``probe_seconds``: the speed probe's total time, split between the
    CPU and the first CUDA device if there is one (None: no probe); ``probe``: further
    :func:`speed_probe` arguments (tests make it tiny)."""
    if probe_seconds is not None and not (isinstance(probe_seconds, (int, float)) and 0 < probe_seconds < 1e6):
        raise ConfigError(f"doctor: probe_seconds must be a number of seconds above 0 and below 1e6, got {probe_seconds!r}")
    report = {"versions": versions(), "platform": platform.platform(), "cpu": cpu_info(), "threads": threads(),
              "devices": devices(), "plugins": plugins(pm), "probe": None}
    if probe_seconds is not None:
        targets = ["cpu"] + (["cuda:0"] if report["devices"]["cuda"] else [])
        report["probe"] = [speed_probe(probe_seconds / len(targets), t, **probe) for t in targets]
    return report
