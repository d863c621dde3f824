"""The report of bench/gpu_check.sh: bench/gpu_bench.py's rows as a markdown table (ratios
against the authors' fp32 row, TFLOP/s against the card's measured peak) and the gpu tests'
results, read from pytest's junit files or, for a run killed before it wrote one, its -v log."""

from __future__ import annotations

import json
from pathlib import Path


def junit_summary(*paths: Path, planned: list[str] | None = None) -> dict:
    """Counts and failing test names from pytest --junitxml files (a test in several: the last).
    Where a run was killed before it wrote its junit file, the results it printed (pytest -v,
    in the .log beside it) stand in for it, and the report says so. ``planned``: the node ids
    the runs were given; those with no result (a run's time limit ended it first) are listed."""
    import re
    import xml.etree.ElementTree as ET

    status, missing = {}, []
    for path in map(Path, paths):
        if path.exists():
            for c in ET.parse(path).getroot().iter("testcase"):
                name = f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}"
                kinds = {child.tag for child in c}
                status[name] = ("failed" if {"failure", "error"} & kinds else
                                "skipped" if "skipped" in kinds else "passed")
            continue
        log = path.with_suffix(".log")
        printed = re.findall(r"^(?:\S+/)?(\w+)\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED)",
                             log.read_text(errors="replace") if log.exists() else "", re.M)
        for module, test, result in printed:
            status[f"{module}::{test}"] = {"PASSED": "passed", "SKIPPED": "skipped"}.get(result, "failed")
        missing.append(f"{path.name} not written (the test run was killed?)"
                       + (f"; {len(printed)} result(s) read from {log.name}" if printed else ""))
    counts = {k: sum(v == k for v in status.values()) for k in ("passed", "failed", "skipped")}
    out = {**counts, "failed_tests": [n for n, v in status.items() if v == "failed"]}
    if planned is not None:  # node id "tests/test_gpu.py::test_x[a]" is junit's "test_gpu::test_x[a]"
        out["not_run"] = [n for n in planned if f"{Path(n.split('::')[0]).stem}::{n.split('::', 1)[1]}" not in status]
    if missing:
        out["error"] = "; " + "; ".join(missing)
    return out


def markdown(res: dict) -> str:
    peak = res["bf16_gemm_tflops"]
    lines = [f"GPU: {res['gpu']}; torch {res['torch']}; CPU: {res['cpu']}",
             f"bf16 dense GEMM peak measured in this run (8192^3 torch.mm, median): {peak:.0f} TFLOP/s; "
             f"fp32 (no TF32): {res['fp32_gemm_tflops']:.1f} TFLOP/s"
             + (f" (read in the run of {res['peaks_from']}; these rows: one process each, compiling side by "
                "side, their timed steps alone on the card)" if "peaks_from" in res else ""), "",
             "| model | variant | precision | compile | ms/step (median) | vs authors' fp32 | peak GB | TFLOP/s | of bf16 peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r for r in res["rows"] if r.get("baseline")}
    for r in res["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['precision']} | {r['compile'] or 'eager'} | "
                         f"{r.get('error', 'skipped')} | | | | |")
            continue
        b = base.get(r["model"])
        ratio = f"{b['ms'] / r['ms']:.2f}x" if b else ""
        tflops = r["tflop_per_step"] / (r["ms"] / 1e3)
        cap = f", memory cap {r['memory_fraction']:.0%}" if r.get("memory_fraction") else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['precision']} | {r['compile'] or 'eager'}{cap} | {r['ms']:.1f} "
                     f"({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {ratio} | {r['peak_gb']:.2f} | {tflops:.1f} | "
                     f"{tflops / peak:.3f} |")
    for d in res.get("decathlon", []):
        lines.append(f"\nDecathlon WRN-28-4 MTAN, batch 128, 72x72, {d['variant']}: " + (
            f"{d['images_per_s']:.0f} images/s ({d['ms']:.1f} ms/step, peak {d['peak_gb']:.2f} GB)"
            if "images_per_s" in d else d.get("error", "no result")))
    for d in res.get("loading", []):
        lines.append(f"\nDecathlon JPEG loading, num_workers={d['workers']}: {d['images_per_s']:.0f} images/s")
    if "loading_error" in res:
        lines.append(f"\nDecathlon JPEG loading: {res['loading_error']}")
    if res.get("missing"):
        lines.append(f"\nno row written by: {', '.join(res['missing'])}")
    t = res.get("tests")
    if t:
        lines.append(f"\ngpu tests (pytest -m gpu): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('skipped', 0)} skipped" + (f"; failed: {', '.join(t['failed_tests'])}"
                                                        if t.get("failed_tests") else "") + t.get("error", ""))
        if t.get("not_run"):
            lines.append(f"\nnot run (a time limit ended their run first): {', '.join(t['not_run'])}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, res: dict) -> None:
    """OUT/gpu_bench.json and OUT/gpu_bench.md, each whole or not at all."""
    from mtlkit.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "gpu_bench.json", res)
    atomic_write_text(out / "gpu_bench.md", markdown(res))


def merge(out: Path, parts: list[Path], peaks_from: Path) -> dict:
    """The rows of several ``gpu_bench.py --only`` runs (each PART/gpu_bench.json) as one report
    in OUT, in the order of PLAN, with the card's peaks from ``peaks_from`` (a whole run's
    gpu_bench.json on the same card); a part whose process died before its first row is named."""
    from gpu_plan import PLAN

    order = {(p[0], p[2], p[3], p[4]): i for i, p in enumerate(PLAN)}
    base = json.loads(peaks_from.read_text())
    res = {k: base[k] for k in ("gpu", "torch", "cpu", "bf16_gemm_tflops", "fp32_gemm_tflops")}
    res["peaks_from"] = peaks_from.name
    res["rows"], res["missing"] = [], []
    for part in parts:
        path = part / "gpu_bench.json"
        if not path.exists():
            res["missing"].append(part.name)
            continue
        rows = json.loads(path.read_text())["rows"]
        res["rows"] += rows
        res["missing"] += [part.name] if not rows else []
    res["rows"].sort(key=lambda r: order.get((r["model"], r["variant"], r["precision"], r["compile"]), len(order)))
    write_report(out, res)
    return res


def fold_in_tests(out: Path) -> dict:
    """The bench's results in OUT (what a killed bench saved, or none) with the results of the
    test shards planned there (OUT/gpu_tests_shard<i>.txt), written back; returns them."""
    path = out / "gpu_bench.json"
    res = json.loads(path.read_text()) if path.exists() else {
        "gpu": "?", "torch": "?", "cpu": "?", "rows": [], "bf16_gemm_tflops": float("nan"),
        "fp32_gemm_tflops": float("nan")}
    plans = sorted(out.glob("gpu_tests_shard*.txt"))
    planned = [n for p in plans for n in p.read_text().split() if "::" in n]
    res["tests"] = junit_summary(*(p.with_suffix(".xml") for p in plans), planned=planned)
    write_report(out, res)
    return res


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "--merge":  # bench/gpu_rows.sh: --merge OUT PEAKS_JSON PART...
        print(markdown(merge(Path(sys.argv[2]), [Path(a) for a in sys.argv[4:]], Path(sys.argv[3]))))
    else:  # bench/gpu_check.sh's last step: python bench/gpu_report.py OUT_DIR
        print(markdown(fold_in_tests(Path(sys.argv[1]))))
