"""bench/gpu_check.sh's parts (the bench's plan, the report, the test shards), checked on the CPU
(the bench itself needs CUDA)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gpu_plan  # noqa: E402
import gpu_report  # noqa: E402


def test_the_plan_measures_the_baseline_first_and_the_cuda_graph_rows_early():
    plan = gpu_plan.PLAN
    assert plan[0][2:5] == ("plain", "fp32", None)  # the authors' computation: every ratio's base
    assert len(set(plan)) == len(plan)
    for mode in ("reduce-overhead", "cuda-graph"):  # torch.compile's graphs; mtlkit's whole-step graph
        graphs = [i for i, p in enumerate(plan) if p[4] == mode]
        assert graphs and graphs[0] < gpu_plan.CORE  # a short session still measures a CUDA-graph row
    assert {p[4] for p in plan} == {None, "default", "reduce-overhead", "cuda-graph"}
    # mtlkit's own step, eager and graphed, in the same precisions: the graph's gain side by side
    engine = {(p[3], p[4]) for p in plan if p[1] == "engine"}
    assert {("fp32", None), ("fp32", "cuda-graph"), ("bf16", None), ("bf16", "cuda-graph")} <= engine
    # every step row names a known override set; the compiled ones run inductor inside the graph too
    steps = [p for p in plan if p[1].startswith("engine")]
    assert {p[1] for p in steps} == set(gpu_plan.ENGINE)
    assert any(gpu_plan.ENGINE[p[1]].get("training.compile") and p[4] == "cuda-graph" for p in steps)
    # the row marked shipped is the NYUv2 recipe's own CUDA choice, measured before any other
    # mtlkit step row is left out by the time budget
    shipped = [i for i, p in enumerate(plan) if "(shipped)" in p[2]]
    assert len(shipped) == 1 and shipped[0] < 8
    model, arch, _, precision, graph, cl = plan[shipped[0]]
    assert (precision, graph, cl) == ("bf16", "cuda-graph", True)
    from mtlkit.engine.precision import resolve
    from mtlkit.recipe.loader import load_recipe

    recipe = load_recipe("nyuv2/mtan").recipe
    on_cuda = resolve(recipe.training, torch.device("cuda", 0))
    overrides = gpu_plan.ENGINE[arch]
    assert overrides["training.channels_last"] == on_cuda.channels_last is True
    assert overrides["training.compile"] == on_cuda.compile is True
    assert overrides["model.attention.params.fast"] is True and recipe.model.attention.params["fast"] == "auto"


def test_rows_that_compile_are_known_and_warm_caches_let_the_unmeasured_rows_fit_the_script():
    import re

    plan = gpu_plan.PLAN
    assert gpu_plan.compiles(plan[1]) and not gpu_plan.compiles(plan[0])  # shipped: inductor; baseline: eager
    for row in plan:  # torch.compile in a mode, or the engine's training.compile override
        expect = row[4] in ("default", "reduce-overhead") or "compile" in row[1]
        assert gpu_plan.compiles(row) == expect, row
    keys = {gpu_plan.row_key(r) for r in plan}
    assert len(keys) == len(plan)
    warm = {gpu_plan.row_key(r) for r in plan if gpu_plan.compiles(r)}
    cold_total = sum(gpu_plan.expected_seconds(r, set()) for r in plan)
    assert sum(gpu_plan.expected_seconds(r, warm) for r in plan) < cold_total
    # bench/gpu_check.sh: tests to T1 (+20 s for a kill), the bench to T2 less 15 s, its GEMM
    # peaks about 10 s: with warm caches the rows through Split Wide and the Decathlon block fit
    script = (BENCH / "gpu_check.sh").read_text()
    t1 = int(re.search(r"LIMIT=\$\(left (\d+)\)", script).group(1))
    t2 = int(re.search(r"--rows all \\\n\s+--budget \"\$\(\( \$\(left (\d+)\)", script).group(1))
    through_decathlon = plan[:[r[0] for r in plan].index("Split Wide SegNet") + 2]
    need = sum(gpu_plan.expected_seconds(r, warm) for r in through_decathlon) + gpu_plan.EXPECTED_SECONDS["decathlon"]
    assert need <= t2 - 15 - (t1 + 20) - 10


def test_the_report_gives_ratios_against_the_baseline_and_lists_skipped_rows():
    rows = [{"model": "MTAN SegNet", "variant": "plain", "precision": "fp32", "compile": None, "ms": 60.0,
             "ms_min": 59.0, "ms_max": 62.0, "peak_gb": 8.0, "tflop_per_step": 3.0, "baseline": True},
            {"model": "MTAN SegNet", "variant": "plain", "precision": "bf16", "compile": "reduce-overhead",
             "ms": 24.0, "ms_min": 23.0, "ms_max": 25.0, "peak_gb": 5.0, "tflop_per_step": 3.0, "baseline": False},
            {"model": "MTAN SegNet", "variant": "fast", "precision": "bf16", "compile": "default",
             "error": "skipped (time budget)"}]
    res = {"gpu": "G", "torch": "T", "cpu": "C", "bf16_gemm_tflops": 500.0, "fp32_gemm_tflops": 50.0, "rows": rows,
           "tests": {"passed": 3, "failed": 1, "skipped": 0, "failed_tests": ["t::x"]}}
    lines = gpu_report.markdown(res).splitlines()
    graph_row = next(line for line in lines if "reduce-overhead" in line)
    cells = [c.strip() for c in graph_row.split("|")]
    assert cells[6] == f"{60.0 / 24.0:.2f}x"  # side by side with the eager fp32 row
    assert math.isclose(float(cells[8]), 3.0 / 0.024, rel_tol=1e-3)
    assert any("eager" in line and "| 60.0" in line for line in lines)
    assert any("skipped (time budget)" in line for line in lines)
    assert any("1 failed" in line and "t::x" in line for line in lines)


def test_junit_summaries_of_the_test_phases_are_merged(tmp_path):
    def junit(name, cases):
        body = "".join(f'<testcase classname="tests.test_gpu" name="{n}">{inner}</testcase>' for n, inner in cases)
        (tmp_path / name).write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
        return tmp_path / name

    first = junit("first.xml", [("a", ""), ("b", '<failure message="x"/>')])
    rest = junit("rest.xml", [("c", '<skipped message="no"/>'), ("d", "")])
    s = gpu_report.junit_summary(first, rest)
    assert (s["passed"], s["failed"], s["skipped"]) == (2, 1, 1) and s["failed_tests"] == ["test_gpu::b"]
    s = gpu_report.junit_summary(first, tmp_path / "killed.xml")
    assert s["passed"] == 1 and "killed.xml not written" in s["error"]
    # a killed run's -v lines stand in for its junit file; the interrupted test is not counted
    (tmp_path / "killed.log").write_text(
        "tests/test_gpu.py::test_x PASSED                              [ 33%]\n"
        "tests/test_graph_step.py::test_y[dwa-bf16] FAILED             [ 66%]\n"
        "tests/test_gpu.py::test_z \n")
    s = gpu_report.junit_summary(first, tmp_path / "killed.xml")
    assert (s["passed"], s["failed"]) == (2, 2) and s["failed_tests"] == ["test_gpu::b", "test_graph_step::test_y[dwa-bf16]"]
    assert "2 result(s) read from killed.log" in s["error"]


def test_the_tests_gpu_check_runs_first_exist():
    """bench/gpu_first.txt names pytest node ids: each a gpu-marked test function of its file."""
    import ast

    ids = [line.strip() for line in (BENCH / "gpu_first.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert ids
    for node in ids:
        file, func = node.split("::")
        func = func.split("[")[0]  # a parametrised test's case
        tree = ast.parse((BENCH.parent / file).read_text())
        names = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert func in names, node


def test_the_profile_ranks_ops_by_their_own_time_and_leaves_annotations_out(tmp_path):
    """bench/gpu_profile.py on the CPU at a tiny size: per-step op times ranked, shares of the
    total that add up to at most 1; device-timeline annotations are not kernels."""
    import gpu_profile

    assert gpu_profile.is_annotation("Optimizer.step#Adam.step")
    assert not gpu_profile.is_annotation("void at::native::batch_norm_backward_kernel<c10::BFloat16, float>(int#)")
    assert not gpu_profile.is_annotation("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc")
    assert gpu_profile.main(["--device", "cpu", "--height", "32", "--width", "48", "--width-mult", "0.0625",
                             "--configs", "plain-fp32", "--steps", "1", "--top", "50", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "gpu_profile.json").read_text())
    assert "error" not in row and row["kernels"] == []  # no device kernels on a CPU
    times = [op["ms"] for op in row["ops"]]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert 0.5 < sum(op["share"] for op in row["ops"]) <= 1.0 + 1e-6
    # the network's convolutions are among the most expensive of its own ops
    assert any("conv" in op["name"] for op in row["ops"][:5])
    assert (tmp_path / "gpu_profile.md").read_text().startswith("## plain-fp32")


def test_junit_summary_lists_the_planned_tests_that_never_ran(tmp_path):
    (tmp_path / "s0.xml").write_text('<testsuites><testsuite name="pytest">'
                                     '<testcase classname="tests.test_gpu" name="test_a[x-1]"/></testsuite></testsuites>')
    (tmp_path / "s1.log").write_text("tests/test_graph_step.py::test_b PASSED    [ 50%]\n"
                                     "tests/test_graph_step.py::test_c \n")  # killed while test_c ran
    planned = ["tests/test_gpu.py::test_a[x-1]", "tests/test_graph_step.py::test_b",
               "tests/test_graph_step.py::test_c", "tests/test_gpu.py::test_d"]
    s = gpu_report.junit_summary(tmp_path / "s0.xml", tmp_path / "s1.xml", planned=planned)
    assert s["passed"] == 2 and s["not_run"] == planned[2:]
    res = {"gpu": "G", "torch": "T", "cpu": "C", "bf16_gemm_tflops": 1.0, "fp32_gemm_tflops": 1.0, "rows": [], "tests": s}
    assert "not run (a time limit ended their run first): " + ", ".join(planned[2:]) in gpu_report.markdown(res)


def test_shards_take_the_first_tests_first_and_balance_the_expected_seconds():
    import random

    import gpu_shards

    rng = random.Random(0)
    for shards in (1, 3, 6):
        tests = [(f"tests/test_x.py::t{i}", rng.choice([0.1, 10.0, 10.0, 150.0])) for i in range(40)]
        first = ["tests/test_x.py::t7", "tests/test_x.py::t3"]
        plan = gpu_shards.plan(tests, shards, first)
        assert sorted(n for s in plan for n in s) == sorted(n for n, _ in tests)  # each test once
        heads = [s[0] for s in plan]
        assert first == heads[:len(first)] if shards >= len(first) else heads[0] == first[0]
        seconds = dict(tests)
        loads = [sum(seconds[n] for n in s) for s in plan]
        # each test went onto the least loaded shard: before its last test, no shard held more
        # than the least loaded one holds in the end
        assert all(load - seconds[s[-1]] <= min(loads) + 1e-9 for s, load in zip(plan, loads))
        if shards > 1:  # longest first: the heavy tests spread over the shards
            heavy = [sum(seconds[n] == 150.0 for n in s) for s in plan]
            assert max(heavy) - min(heavy) <= 2
    assert gpu_shards.plan([], 4, []) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the real checks")
def test_gpu_check_script_runs_every_gpu_test_in_its_shards_and_reports_without_a_gpu(tmp_path):
    """bench/gpu_check.sh end to end on a CPU: every gpu test planned into a shard, each shard run
    (skipped here: no CUDA), the bench's failure survived, the report written with every test."""

    env = {**os.environ, "GPU_SHARDS": "2", "PYTHON": sys.executable}
    stale = {"gpu": "an earlier run's", "rows": [{"model": "MTAN SegNet", "ms": 1.0}]}
    (tmp_path / "gpu_bench.json").write_text(json.dumps(stale))  # must not pass for this run's
    (tmp_path / "gpu_tests_shard7.txt").write_text("tests/test_gpu.py::test_gone\n")
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not list(tmp_path.glob("gpu_tests_shard*"))  # packed, with the logs and junit files
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "xzf", str(tmp_path / "gpu_tests.tgz"), "-C", str(tmp_path / "x")], check=True)
    plans = sorted((tmp_path / "x").glob("gpu_tests_shard*.txt"))
    assert {p.with_suffix(".log").exists() and p.with_suffix(".xml").exists() for p in plans} == {True}
    nodes = [n for p in plans for n in p.read_text().splitlines()]
    assert len(plans) == 2 and len(nodes) == len(set(nodes))
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                                "-p", "no:cacheprovider"], cwd=BENCH.parent, capture_output=True, text=True)
    assert set(nodes) == {line for line in collected.stdout.splitlines() if "::" in line}
    first = [line for line in (BENCH / "gpu_first.txt").read_text().splitlines() if line and line[0] != "#"]
    assert [p.read_text().splitlines()[0] for p in plans] == first[:2]
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert res["gpu"] == "?" and res["rows"] == []  # the bench failed here: no rows, none stale
    report = res["tests"]
    assert report["skipped"] == len(nodes) and report["not_run"] == [] and report["failed"] == 0
    assert f"0 passed, 0 failed, {len(nodes)} skipped" in (tmp_path / "gpu_bench.md").read_text()


def test_the_bench_skips_rows_whose_expected_seconds_do_not_fit_and_counts_warm_caches(tmp_path, monkeypatch):
    """gpu_bench.main with the measuring stubbed (no CUDA here): which rows run, in PLAN order,
    is decided by their expected seconds against --budget; a row warmed by --warm expects less."""
    import gpu_bench

    clock, warm, measured = [0.0], set(), []
    monkeypatch.setattr(gpu_bench.time, "perf_counter", lambda: clock[0])

    def fake_measure(row, steps):  # each row takes exactly its expected seconds
        measured.append(row)
        clock[0] += gpu_plan.expected_seconds(row, warm)
        return {"ms": 10.0, "ms_min": 9.0, "ms_max": 11.0, "peak_gb": 1.0, "peak_gb_warmup": 1.0, "loss_finite": True}

    monkeypatch.setattr(gpu_bench, "measure", fake_measure)
    monkeypatch.setattr(gpu_bench, "gemm_peak", lambda *a, **k: {"median": 1e5})
    monkeypatch.setattr(gpu_bench, "gpu_description", lambda: "no GPU (stubbed)")
    monkeypatch.setattr(gpu_bench, "decathlon_row", lambda *a, **k: {"ms": 1.0, "images_per_s": 1.0, "peak_gb": 1.0})
    monkeypatch.setattr(gpu_bench, "loading_rows", lambda: [{"workers": 0, "images_per_s": 5.0}])
    first = gpu_plan.PLAN[:5]
    shipped = gpu_plan.row_key(first[1])
    # the baseline, the shipped step with warm caches, the step as a graph: this budget and no more
    budget = str(sum(gpu_plan.expected_seconds(r, {shipped}) for r in first[:3]) + 1)

    def run(warmed: list[str]) -> dict:
        clock[0] = 0.0
        measured.clear()
        warm.clear()
        warm.update(warmed)
        (tmp_path / "gpu_bench_warm.json").write_text(json.dumps(warmed))
        assert gpu_bench.main(["--out", str(tmp_path), "--first", "5", "--budget", budget]) == 0
        return json.loads((tmp_path / "gpu_bench.json").read_text())

    res = run([])  # cold: the shipped row's compile does not fit; the shorter rows after it do
    assert measured == [first[0], *first[2:]] and res["rows"][1]["cache_warmed"] is False
    assert [r.get("error") for r in res["rows"]] == [None, "skipped (time budget)", None, None, None]
    assert res["decathlon"] == [{"variant": "all", "error": "skipped (time budget)"}]
    assert "skipped (time budget)" in (tmp_path / "gpu_bench.md").read_text()
    res = run([shipped])  # warm: the first three rows, in order
    assert measured == first[:3] and res["rows"][1]["cache_warmed"] is True
    assert [r.get("error") for r in res["rows"]][3:] == ["skipped (time budget)"] * 2


def test_warming_compiles_only_the_compiled_rows_and_lists_those_that_succeeded(tmp_path, monkeypatch):
    import gpu_bench

    plan = gpu_plan.PLAN[:12]
    compiled = [r for r in plan if gpu_plan.compiles(r)]
    assert len(compiled) >= 3
    seen = []

    def fake_measure(row, steps):
        seen.append((row, steps))
        if row == compiled[1]:
            raise RuntimeError("inductor failed")
        return {}

    monkeypatch.setattr(gpu_bench, "measure", fake_measure)
    gpu_bench.warm(plan, tmp_path)
    assert seen == [(r, 1) for r in compiled]  # one step each, in PLAN order, eager rows left out
    listed = json.loads((tmp_path / "gpu_bench_warm.json").read_text())
    assert listed == [gpu_plan.row_key(r) for r in compiled if r != compiled[1]]


def test_the_decathlon_and_loading_rows_run_their_real_model_and_data_on_a_cpu(monkeypatch):
    """The bench's Decathlon rows (never yet reached on a GPU) on the CPU, at batch 2: the real
    WRN-28-4 MTAN, one domain per step in turn, in bf16 + channels-last (the fp32 row is the
    same code without both), and the JPEG loading row; only the CUDA-event timer is replaced by
    a host-side loop."""
    import time

    import decathlon_throughput
    import gpu_bench

    asked = []
    real_build = decathlon_throughput.build_model

    def recording_build(*args):
        attention, net, tasks = real_build(*args)
        forward = net.forward
        net.forward = lambda x, tasks=None: asked.append(tasks) or forward(x, tasks=tasks)
        return attention, net, tasks

    def cpu_timed(step, steps, warmup):
        t = time.perf_counter()
        losses = [v for i in range(warmup + steps) for v in step(i)]
        ms = (time.perf_counter() - t) * 1e3 / (warmup + steps)
        return {"ms": ms, "ms_min": ms, "ms_max": ms, "peak_gb": 0.0, "peak_gb_warmup": 0.0,
                "loss_finite": all(bool(torch.isfinite(v)) for v in losses)}

    monkeypatch.setattr(decathlon_throughput, "build_model", recording_build)
    monkeypatch.setattr(gpu_bench, "timed", cpu_timed)
    row = gpu_bench.decathlon_row("bf16", True, steps=1, batch=2, device="cpu")
    assert row["loss_finite"] and row["images_per_s"] == pytest.approx(2 / (row["ms"] / 1e3))
    from mtlkit.plugins.decathlon.domains import DOMAINS

    assert asked == [[d] for d in list(dict(DOMAINS))[:4]]  # 3 warm-up steps and one timed, a domain each
    rows = gpu_bench.loading_rows(images=40, device="cpu")
    assert [r["workers"] for r in rows] == [0]  # the engine's CPU default is 0 workers
    assert rows[0]["images"] == 40 and rows[0]["images_per_s"] > 0
