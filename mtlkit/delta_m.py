"""Delta_m%: the average relative change of a multi-task model against single-task baselines.

    Delta_m% = (1/M) sum_i (-1)^{h_i} (Mm_i - Ms_i) / Ms_i * 100

with ``Mm`` the multi-task value, ``Ms`` the single-task (STL) value and ``h_i = 1`` when
higher is better. Lower is better; negative means the multi-task model beats the baselines.

By default (``per_task_first=False``) the mean runs over all M metrics of all tasks (the
convention of the published NYUv2 tables: 9 metrics). With ``per_task_first=True`` each
task's metrics are averaged first and then the K task means are averaged, so a task with
many metrics (normals: 5) does not outweigh one with few. Report which one you use.

The metrics used are those of the single-task baseline ``stl``; every one must be present
in ``mtl`` and in ``higher_is_better`` (extra entries in ``mtl`` are ignored). A task's
validation ``loss`` (which classification records next to its accuracy, so that a
Decathlon run's baseline results carry one per domain) is left out: it is a training
quantity, not one of the paper's metrics, and would count as one more "metric" per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import ConfigError

# Recorded next to the metrics but never part of Delta_m (see the module docstring).
NOT_METRICS = frozenset({"loss"})


def relative_changes(
    mtl: Mapping[str, Mapping[str, float]],
    stl: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> dict[str, dict[str, float]]:
    """Per task and metric, ``(-1)^h (Mm - Ms) / Ms * 100`` (positive = worse than STL)."""
    if not stl:
        raise ConfigError("delta_m: the single-task baseline has no tasks")
    out: dict[str, dict[str, float]] = {}
    for task, base in stl.items():
        base = {m: v for m, v in base.items() if m not in NOT_METRICS}
        if not base:
            raise ConfigError(f"delta_m: single-task baseline of task '{task}' has no metrics")
        if task not in mtl:
            raise ConfigError(f"delta_m: task '{task}' is in the single-task baseline but not in the multi-task results")
        out[task] = {}
        for metric, ms in base.items():
            where = f"delta_m: {task}.{metric}"
            if metric not in mtl[task]:
                raise ConfigError(f"{where} is missing from the multi-task results")
            try:
                higher = bool(higher_is_better[task][metric])
            except KeyError:
                raise ConfigError(f"{where}: direction missing from higher_is_better") from None
            ms, mm = float(ms), float(mtl[task][metric])
            if ms == 0 or not math.isfinite(ms):
                raise ConfigError(f"{where}: single-task value {ms} cannot be a baseline (zero or not finite)")
            if not math.isfinite(mm):
                raise ConfigError(f"{where}: multi-task value {mm} is not finite")
            change = (mm - ms) / ms * 100.0
            out[task][metric] = -change if higher else change
    return out


def delta_m(
    mtl: Mapping[str, Mapping[str, float]],
    stl: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    per_task_first: bool = False,
) -> float:
    """Delta_m% of ``mtl`` against ``stl`` (see the module docstring)."""
    changes = relative_changes(mtl, stl, higher_is_better)
    if per_task_first:
        per_task = [sum(c.values()) / len(c) for c in changes.values()]
        return sum(per_task) / len(per_task)
    values = [v for c in changes.values() for v in c.values()]
    return sum(values) / len(values)
