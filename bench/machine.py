"""What every benchmark prints next to its figures: the CPU (model, ISA flags), the GPU, and
the GEMM peak as the median of several readings (one reading swings with the load)."""

from __future__ import annotations

import platform
import statistics
import time

ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """``model; ISA flags present (of ISA_FLAGS); logical CPUs``, from /proc/cpuinfo where it exists."""
    import os

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    present = [f for f in ISA_FLAGS if f in flags] or ["(no /proc/cpuinfo flags)"]
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = "?"
    return f"{model}; ISA: {' '.join(present)}; torch kernels: {capability}; {os.cpu_count()} logical CPUs"


def gpu_description() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, driver-visible devices: {torch.cuda.device_count()}")


def gemm_peak(n: int = 2048, readings: int = 7, device: str = "cpu", dtype=None) -> dict[str, float]:
    """torch.mm on n x n matrices: median, min and max GFLOP/s over ``readings`` (after a warm-up)."""
    import torch

    dtype = dtype or torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 10 if device == "cuda" else 1
    torch.mm(a, b)
    sync()
    rates = []
    for _ in range(readings):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        rates.append(reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
