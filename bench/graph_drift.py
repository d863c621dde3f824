"""Where a CUDA-graphed training run and an eager one part, step by step (CUDA only).

    python bench/graph_drift.py [--out FILE.json]

The tiny MTAN of tests/test_gpu.py, as test_graph_step.py's graph-against-eager test trains
it (3 epochs of 5 steps, the lr halved each epoch, deterministic algorithms), in three
settings: DWA + bf16 + Adam, DWA + fp32 + Adam, equal + bf16 + SGD. For each, the runs
below against one eager run, as the largest relative gap of any task's loss at each step:
- ``graph``: ``training.cuda_graph = "on"`` (its warm-up steps run on a side stream);
- ``eager2``: the same eager run again (what deterministic algorithms leave);
- ``side stream``: eager, the whole run on a non-default CUDA stream (cuBLAS keeps a
  workspace per stream, and its kernel choice may follow it);
- ``no cast cache``: eager with autocast's cache of cast weights off, as the graphed run's
  warm-up and capture have it (a weight used several times in one forward pass is then cast
  once per use, and its gradient summed in fp32 rather than in bf16);
- ``lr+1e-6``: eager with the learning rate 1e-6 larger (how training carries a tiny
  difference on).
Every eager run takes ``capturable`` Adam, the graphed run's optimiser arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mtlkit  # noqa: E402
from mtlkit.engine import stages  # noqa: E402
from mtlkit.rundir import read_log  # noqa: E402

SETTINGS = [("dwa", "bf16", "adam"), ("dwa", "fp32", "adam"), ("equal", "bf16", "sgd")]


def losses(recipe: Path, run_dir: Path, overrides: dict, side_stream: bool = False,
           autocast_cache: bool = True) -> list[dict]:
    built = mtlkit.build_trainer(str(recipe), run_dir=run_dir, overrides=overrides)
    built.trainer.train_step.precision.autocast_cache = autocast_cache
    if side_stream:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            built.trainer.fit()
        torch.cuda.current_stream().wait_stream(stream)
    else:
        built.trainer.fit()
    return [r["losses"] for r in read_log(built.run_dir) if r["type"] == "step"]


def gaps(a: list[dict], b: list[dict]) -> list[float]:
    return [max(abs(x[t] - y[t]) / max(abs(y[t]), 1e-6) for t in y) for x, y in zip(a, b)]


def main(argv=None) -> int:
    from test_gpu import dense_recipe
    from test_graph_step import always_capturable, graph_run_overrides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = {}
    cuda = torch.cuda.is_available()  # on a CPU (a smoke run of this script): the eager runs only
    original = stages.build_optimizer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for weighting, precision, optimizer in SETTINGS:
            name = f"{weighting}-{precision}-{optimizer}"
            (tmp / name).mkdir()
            recipe = dense_recipe(tmp / name, "mtan", weighting)
            base = {**graph_run_overrides(precision, optimizer), "training.cuda_graph": "off",
                    "training.device": "cuda" if cuda else "cpu"}
            stages.build_optimizer = original
            graph = losses(recipe, tmp / name / "graph", {**base, "training.cuda_graph": "on"}) if cuda else []
            stages.build_optimizer = always_capturable if cuda else original
            eager = losses(recipe, tmp / name / "eager", base)
            runs = {"graph": graph,
                    "eager2": losses(recipe, tmp / name / "eager2", base),
                    "side stream": losses(recipe, tmp / name / "side", base, side_stream=cuda),
                    "no cast cache": losses(recipe, tmp / name / "nocache", base, autocast_cache=False),
                    "lr+1e-6": losses(recipe, tmp / name / "lr", {**base, "optimizer.lr": 1e-3 * (1 + 1e-6)})}
            report[name] = {k: gaps(v, eager) for k, v in runs.items()}
            report[name]["eager losses"] = eager
            report[name]["graph losses"] = graph
            print(name)
            for k, v in runs.items():
                print(f"  {k:12s} " + " ".join(f"{g:.1e}" for g in report[name][k]), flush=True)
    stages.build_optimizer = original
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
