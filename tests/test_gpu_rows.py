"""bench/gpu_rows.sh's parts, checked on the CPU: ``gpu_bench.py --only`` (rows whatever the
budget, no peak readings), the card lock its processes take turns by, and the merge."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gpu_bench  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_report  # noqa: E402


@pytest.fixture
def stubbed(monkeypatch):
    """gpu_bench without CUDA: each measured row takes ms = 10 * (its PLAN index + 1)."""
    measured = []

    def fake_measure(row, steps):
        measured.append(row)
        ms = 10.0 * (gpu_plan.PLAN.index(row) + 1)
        return {"ms": ms, "ms_min": ms, "ms_max": ms, "peak_gb": 1.0, "peak_gb_warmup": 2.0, "loss_finite": True}

    monkeypatch.setattr(gpu_bench, "measure", fake_measure)
    monkeypatch.setattr(gpu_bench, "gemm_peak", lambda *a, **k: pytest.fail("--only reads no peak"))
    monkeypatch.setattr(gpu_bench, "gpu_description", lambda: "no GPU (stubbed)")
    return measured


def test_only_rows_run_whatever_the_budget_and_merge_in_plan_order(tmp_path, stubbed):
    parts = [tmp_path / "row7", tmp_path / "row0", tmp_path / "dead"]
    assert gpu_bench.main(["--out", str(parts[0]), "--only", "7", "--budget", "0", "--memory-fraction", "0.3"]) == 0
    assert gpu_bench.main(["--out", str(parts[1]), "--only", "0", "--budget", "0"]) == 0
    assert stubbed == [gpu_plan.PLAN[7], gpu_plan.PLAN[0]]  # a zero budget skips nothing asked for
    peaks = tmp_path / "whole_run.json"
    peaks.write_text(json.dumps({"gpu": "G", "torch": "T", "cpu": "C", "bf16_gemm_tflops": 700.0,
                                 "fp32_gemm_tflops": 50.0, "rows": []}))
    res = gpu_report.merge(tmp_path, parts, peaks)
    assert [r["variant"] for r in res["rows"]] == [gpu_plan.PLAN[0][2], gpu_plan.PLAN[7][2]]
    assert res["bf16_gemm_tflops"] == 700.0 and res["missing"] == ["dead"]
    assert json.loads((tmp_path / "gpu_bench.json").read_text()) == res
    md = (tmp_path / "gpu_bench.md").read_text()
    row7 = next(line for line in md.splitlines() if gpu_plan.PLAN[7][4] in line)
    cells = [c.strip() for c in row7.split("|")]
    assert cells[4].endswith("memory cap 30%")
    assert cells[6] == f"{10.0 / 80.0:.2f}x"  # against the baseline row of the other process
    assert "no row written by: dead" in md and "whole_run.json" in md


def test_the_card_lock_lets_one_process_time_at_once(tmp_path, monkeypatch):
    lock = tmp_path / "card.lock"
    monkeypatch.setattr(gpu_bench, "GPU_LOCK", lock)
    entered = threading.Event()

    def timed_steps():
        with gpu_bench.card_to_itself():
            entered.set()

    with open(lock, "a") as held:  # another row's timed steps (flock(2), as flock(1) takes it)
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=timed_steps)
        t.start()
        assert not entered.wait(0.5)  # waits while the card is taken
        fcntl.flock(held, fcntl.LOCK_UN)
    assert entered.wait(10)
    t.join()
    with gpu_bench.card_to_itself():  # released again: a second holder gets it
        pass


def test_gpu_rows_script_merges_what_each_process_wrote_without_a_gpu(tmp_path):
    """Without CUDA each row's process reports the lack as its row's error; the script still
    merges them in PLAN order, packs each row's log and leaves no loose part behind."""
    peaks = tmp_path / "whole_run.json"
    peaks.write_text(json.dumps({"gpu": "G", "torch": "T", "cpu": "C", "bf16_gemm_tflops": 1.0,
                                 "fp32_gemm_tflops": 1.0, "rows": []}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_bench.json").write_text("{}")  # a stale result: removed first
    run = subprocess.run(["bash", str(BENCH / "gpu_rows.sh"), str(out), str(peaks), "120", "3", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    res = json.loads((out / "gpu_bench.json").read_text())
    assert [(r["model"], r["precision"]) for r in res["rows"]] == [gpu_plan.PLAN[0][::3], gpu_plan.PLAN[3][::3]]
    assert all("error" in r and r["memory_fraction"] == 0.45 for r in res["rows"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_bench.json", "gpu_bench.md", "gpu_rows.tgz"]
