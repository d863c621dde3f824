"""``mtlkit doctor``: the report's fields, a shortened speed probe, a failing plugin shown."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from mtlkit import plugin_manager
from mtlkit.cli import main
from mtlkit.doctor import cpu_info, doctor, speed_probe

TINY_PROBE = dict(gemm_size=64, conv_batch=1, readings=3)


def test_report_fields_and_a_shortened_probe():
    report = doctor(probe_seconds=0.05, **TINY_PROBE)
    v = report["versions"]
    assert {"python", "mtlkit", "torch", "torchvision", "timm", "pluggy", "pydantic", "rich", "safetensors"} <= set(v)
    assert v["torch"] == torch.__version__ and v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["threads"]["torch"] == torch.get_num_threads() >= 1
    cpu = report["cpu"]
    assert cpu["usable_cores"] >= 1 and cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if cpu["flags"] is not None and cpu["torch_cpu_capability"] in ("AVX2", "AVX512"):
        assert cpu["flags"]["avx2"]  # torch's dispatch and the CPU's own flags agree
    assert report["devices"]["cuda"] == [] if not torch.cuda.is_available() else len(report["devices"]["cuda"]) >= 1
    import torch.distributed as dist

    backends = report["devices"]["distributed"]
    assert backends["gloo"] == dist.is_gloo_available() and backends["nccl"] == dist.is_nccl_available()
    if backends["nccl"] and backends["nccl_version"]:  # "major.minor.patch", as torch.cuda.nccl reports it
        assert tuple(map(int, backends["nccl_version"].split("."))) == tuple(torch.cuda.nccl.version())
    plugins = report["plugins"]
    assert plugins["error"] is None and "tensorboard" in plugins["components"]["logger"]
    assert "mtan" in plugins["components"]["attention"]
    probes = report["probe"]
    assert [p["device"] for p in probes] == ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    p = probes[0]
    for key in ("gemm_gflops", "conv_ms", "conv_gflops"):
        assert math.isfinite(p[key]) and p[key] > 0, key
    lo, hi = p["gemm_gflops_range"]
    assert 0 < lo <= p["gemm_gflops"] <= hi
    # the conv rate is its flop count over its median time: 3 x 2 * N*56*56*64*64*9
    assert p["conv_gflops"] * p["conv_ms"] / 1e3 == pytest.approx(3 * 2 * 56 * 56 * 64 * 64 * 9 / 1e9, rel=1e-9)
    json.dumps(report)  # plain JSON throughout


def test_readings_time_the_calls():
    """A call that takes 2 ms on the clock reads 2 ms, repeated to fill the budget."""
    from mtlkit.doctor import _readings

    clock, calls = [0.0], []

    def run(cost):
        calls.append(cost)
        clock[0] += cost

    out = _readings(lambda: run(0.002), lambda: None, budget=0.1, readings=5, clock=lambda: clock[0])
    assert out == pytest.approx([0.002] * 5)
    assert len(calls) == 2 + 5 * 10  # a warm-up, one timed call, then 5 readings of 0.1 / 5 / 0.002 calls
    calls.clear()
    out = _readings(lambda: run(0.05), lambda: None, budget=0.1, readings=5, clock=lambda: clock[0])
    assert out == pytest.approx([0.05] * 3) and len(calls) == 2 + 3  # slow calls: 3 readings of one call


def test_rates_are_flops_over_the_median_time(monkeypatch):
    import mtlkit.doctor as doc

    monkeypatch.setattr(doc, "_readings", lambda run, sync, budget, readings: [1e-3, 4e-3, 2e-3])
    p = speed_probe(0.01, **TINY_PROBE)
    assert p["gemm_gflops"] == pytest.approx(2 * 64**3 / 2e-3 / 1e9)  # 2 n^3 flops over the median
    assert p["gemm_gflops_range"] == pytest.approx([2 * 64**3 / 4e-3 / 1e9, 2 * 64**3 / 1e-3 / 1e9])
    assert p["conv_ms"] == pytest.approx(2.0)


def test_isa_flags_from_cpuinfo():
    text = ("processor\t: 0\nmodel name\t: Example Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n\n"
            "processor\t: 1\nmodel name\t: Example Xeon\nflags\t\t: fpu\n")
    info = cpu_info(text)
    assert info["model"] == "Example Xeon"
    flags = info["flags"]
    assert flags["avx2"] and flags["avx512f"] and flags["amx_tile"]
    assert not flags["amx_bf16"] and not flags["avx512_vnni"]
    assert cpu_info("")["flags"] is None  # no /proc/cpuinfo: unknown, not "none"


@pytest.fixture
def broken_entry_point(tmp_path, monkeypatch):
    """An installed plugin (entry point) that fails to import, with brackets in its error."""
    dist = tmp_path / "broken_mtlkit_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-mtlkit-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mtlkit]\nbroken = broken_doctor_plugin\n")
    (tmp_path / "broken_doctor_plugin.py").write_text("raise ImportError('needs [gpu] extra')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = plugin_manager._MANAGER
    pm = plugin_manager.reset_plugin_manager(load_entry_points=True)
    yield pm
    plugin_manager._MANAGER = saved


def test_a_failing_plugin_shows_up(broken_entry_point, capsys):
    report = doctor(probe_seconds=None, pm=broken_entry_point)
    assert report["probe"] is None
    assert report["plugins"]["failed"] == {"broken": "ImportError: needs [gpu] extra"}
    assert "segnet" in report["plugins"]["components"]["backbone"]  # the rest still loads
    capsys.readouterr()

    assert main(["doctor", "--seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "broken: ImportError: needs [gpu] extra" in out  # brackets kept, not markup
    assert "logger" in out and "tensorboard" in out

    assert main(["doctor", "--json", "--seconds", "0"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["plugins"]["failed"] == {"broken": "ImportError: needs [gpu] extra"}
    assert parsed["probe"] is None and parsed["versions"]["torch"] == torch.__version__


def test_negative_probe_time_is_refused(capsys):
    assert main(["doctor", "--seconds", "-1"]) == 2
    assert "--seconds" in capsys.readouterr().err
