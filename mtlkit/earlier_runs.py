"""What a recipe takes from earlier runs: Delta_m baselines (their ``results.json``) and
starting weights (``model.init_from``, their checkpoints).

Both are read by :func:`mtlkit.preflight.prepare` before a run writes anything, so that a
missing or foreign earlier run is a one-line error and not a half-made run folder.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from .delta_m import NOT_METRICS
from .errors import ConfigError, MtlkitError, did_you_mean
from .rundir import read_results


def resolve_baselines(baselines: dict, recipe_path: Path | None) -> dict[str, dict[str, float]]:
    """Recipe baselines: metric tables as given, or read from earlier runs' results.json
    (a relative path is tried as given first, then next to the recipe)."""
    out = {}
    for task, spec in baselines.items():
        if isinstance(spec, dict):
            out[task] = spec
            continue
        path = Path(spec)
        if not path.is_absolute() and recipe_path is not None and not path.exists():
            path = recipe_path.parent / path
        results = path / "results.json" if path.is_dir() else path
        if not results.is_file():
            raise ConfigError(f"[baselines] {task}: '{spec}' is not a run folder with a results.json")
        out[task] = baseline_from(results, task)
    return out


def baseline_from(results: Path, task: str) -> dict[str, float]:
    """``task``'s metrics in a results.json: the mean of its last n evaluations if recorded,
    else its final one; each metric Delta_m uses must be a finite number."""
    try:
        data = read_results(results)  # the one reader: not UTF-8, not JSON, not a results table
    except MtlkitError as exc:
        raise ConfigError(f"[baselines] {task}: {exc}") from None
    field, table = "final", data.get("final") or {}
    if (data.get("last_n_mean") or {}).get("metrics"):
        field, table = "last_n_mean.metrics", data["last_n_mean"]["metrics"]
    if task not in table:
        raise ConfigError(f"[baselines] {task}: {results} has no results for task '{task}'")
    for metric, value in table[task].items():
        if metric not in NOT_METRICS and (value is None or not math.isfinite(value)):
            raise ConfigError(f"[baselines] {task}: {results}: field '{field}.{task}.{metric}' is "
                              f"{json.dumps(value)}, not a finite number")
    return table[task]


def check_baselines(baselines: dict[str, dict[str, float]], tasks: dict) -> None:
    """Each baseline is one Delta_m can use: at least one metric besides the loss, each
    metric one its task's evaluation reports (its metric state's ``higher_is_better``), each
    value a usable divisor. Delta_m itself would refuse these only after the first epoch."""
    for task, table in baselines.items():
        if task not in tasks:
            continue  # the Trainer's own check names it
        known = list(tasks[task].metrics().higher_is_better)
        metrics = {m: v for m, v in table.items() if m not in NOT_METRICS}
        if not metrics:
            raise ConfigError(f"[baselines] {task}: no metric besides {', '.join(sorted(NOT_METRICS))} "
                              f"(task '{task}' reports: {', '.join(known)})")
        for metric, value in metrics.items():
            if known and metric not in known:
                raise ConfigError(f"[baselines] {task}: '{metric}' is not a metric of task '{task}'"
                                  f"{did_you_mean(metric, known)} (it reports: {', '.join(known)})")
            if value == 0:
                raise ConfigError(f"[baselines] {task}: {metric} = 0 cannot be a baseline (Delta_m divides by it)")


def init_from(model, spec) -> None:
    """Load the weights a recipe's ``model.init_from`` names (include/exclude globs)."""
    from .engine import load_model_weights  # torch: only when a recipe asks for it

    def keep(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in spec.include) and not any(
            fnmatch.fnmatchcase(key, p) for p in spec.exclude)

    load_model_weights(model, newest_run(Path(spec.path)), key_filter=keep, which="best")  # best, else last


def newest_run(path: Path) -> Path:
    """A file or run folder as it is; a folder of run folders (runs/<name>) -> its newest run."""
    if path.is_dir() and not (path / "checkpoints").is_dir():
        runs = sorted(p for p in path.iterdir() if (p / "checkpoints").is_dir())
        if not runs:
            raise ConfigError(f"[model.init_from] path: '{path}' holds no run folder with checkpoints")
        return runs[-1]  # run folders are named by their start time
    return path
