"""``mtlkit doctor``: versions, devices, threads, ISA flags, plugins and a speed probe on
one screen (or as JSON): what a bug report needs."""

from __future__ import annotations

import argparse
import json

from rich.table import Table
from rich.text import Text

from ..argtypes import float_range
from .output import console

MAX_PROBE_SECONDS = 600.0


def register_commands(register) -> None:
    register("doctor", doctor_command, configure=_configure,
             help="versions, devices, ISA flags, plugins and a 5-second speed probe (for bug reports)")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--seconds", type=float_range(0.0, MAX_PROBE_SECONDS), default=5.0,
                   help=f"length of the speed probe, up to {MAX_PROBE_SECONDS:g} (0: no probe)")


def doctor_command(args: argparse.Namespace) -> int:
    from ..doctor import doctor

    report = doctor(probe_seconds=args.seconds or None)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        console().print(render(report))
    return 0


def _fmt(value) -> str:
    return "-" if value is None else str(value)


def render(report: dict) -> Table:
    """The report as one two-column table, a section per group of rows (values are shown
    as text: a plugin's error message may hold brackets that are not markup)."""
    table = Table(title="mtlkit doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")

    def row(what: str, value: str, style: str = "") -> None:
        table.add_row(Text(what, style=style or "bold"), Text(value, style=style))

    row("versions", ", ".join(f"{k} {_fmt(x)}" for k, x in report["versions"].items()))
    row("platform", report["platform"])
    cpu = report["cpu"]
    isa = ", ".join(f for f, on in cpu["flags"].items() if on) if cpu["flags"] else "(no /proc/cpuinfo)"
    row("cpu", f"{_fmt(cpu['model'])} ({cpu['machine']}), {cpu['usable_cores']} of {cpu['logical_cores']} "
               f"cores usable")
    row("isa", f"{isa}; torch kernels: {cpu['torch_cpu_capability']}")
    t = report["threads"]
    row("threads", f"torch {t['torch']} (inter-op {t['torch_interop']}), OMP_NUM_THREADS="
                   f"{_fmt(t['OMP_NUM_THREADS'])}, MKL_NUM_THREADS={_fmt(t['MKL_NUM_THREADS'])}")
    d = report["devices"]
    cuda = "; ".join(f"cuda:{g['index']} {g['name']} {g['memory_gib']} GiB (sm {g['capability']})"
                     for g in d["cuda"]) or "none"
    row("devices", f"CUDA: {cuda} (runtime {_fmt(d['cuda_runtime'])}, cuDNN {_fmt(d['cudnn'])}); "
                   f"MPS: {'yes' if d['mps'] else 'no'}")
    b = d["distributed"]
    row("torchrun", f"gloo {'yes' if b['gloo'] else 'no'}; nccl " + (
        f"yes ({b['nccl_version'] or 'version unknown'})" if b["nccl"] else "no"))
    table.add_section()
    p = report["plugins"]
    if p["error"]:
        row("plugins", p["error"], "red")
    for kind, names in p["components"].items():
        row(kind, ", ".join(names) or "-")
    sources: dict[str, int] = {}
    for source in p["loaded"].values():
        sources[source] = sources.get(source, 0) + 1
    row("plugins", ", ".join(f"{n} {s}" for s, n in sources.items()) or "-")
    for name, error in p["failed"].items():
        row("failed", f"{name}: {error}", "red")
    if report["probe"]:
        table.add_section()
    for probe in report["probe"] or []:
        lo, hi = probe["gemm_gflops_range"]
        row(f"speed {probe['device']}",
            f"GEMM {probe['gemm_size']}^2 fp32: {probe['gemm_gflops']:.1f} GFLOP/s (median; {lo:.1f}-{hi:.1f}); "
            f"conv {probe['conv_shape']}: {probe['conv_ms']:.1f} ms ({probe['conv_gflops']:.1f} GFLOP/s)")
    return table
