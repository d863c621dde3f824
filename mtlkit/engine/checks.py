"""The checks the Trainer makes before training, as functions of the parts alone.

The Trainer calls them from its constructor; ``mtlkit run`` and ``mtlkit validate`` call
them (through :func:`mtlkit.preflight.prepare`) before anything is written, so both
commands refuse the same recipes with the same messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..contracts import Task, Weighting
from ..errors import ConfigError, DataError, did_you_mean
from .config import TrainingConfig


WORKERS_PER_CPU = 8  # well past any speed-up; beyond it a typo forks thousands of processes


def check_data(tasks: Mapping[str, Task], train_data: Any, val_data: Any, cfg: TrainingConfig) -> None:
    """Training data: non-empty; many-to-many domains are tasks; per-domain settings fit the data;
    a loader worker count this machine can run (each worker is a process)."""
    cpus = os.cpu_count() or 1
    if cfg.num_workers is not None and cfg.num_workers > WORKERS_PER_CPU * cpus:
        raise ConfigError(f"training.num_workers = {cfg.num_workers}: more than {WORKERS_PER_CPU} loader processes "
                          f"per CPU of this machine ({cpus} CPUs)")
    if isinstance(train_data, Mapping):
        if not train_data:
            raise ConfigError("train_data: no domains")
        for d, ds in train_data.items():
            if d not in tasks:
                raise ConfigError(f"train_data: domain '{d}' is not a task (tasks: {', '.join(tasks)})")
            if len(ds) == 0:
                raise DataError(f"train_data: domain '{d}' has no samples")
        for field, values in (("domain_batch_size", cfg.domain_batch_size),
                              ("domain_loss_weight", cfg.domain_loss_weight),
                              ("mixed_domains", cfg.mixed_domains)):
            for d in values:
                if d not in train_data:
                    raise ConfigError(f"training.{field}: '{d}' is not a domain of the training data"
                                      f"{did_you_mean(d, train_data)}")
        if val_data is not None and not isinstance(val_data, Mapping):
            raise ConfigError("val_data: many-to-many training needs a dict domain -> Dataset for validation")
    else:
        if len(train_data) == 0:
            raise DataError("train_data: no samples")
        for field in ("domain_batch_size", "domain_loss_weight", "mixed_domains"):
            if getattr(cfg, field):
                raise ConfigError(f"training.{field} applies to many-to-many data (a dict of domains) only")


def check_weighting(weighting: Weighting, tasks: Mapping[str, Task], many_to_many: bool, model: Any = None,
                    domain_order: str | None = None) -> None:
    """The weighting serves exactly these tasks; gradient-level ones see every task per batch
    (many-to-many: only with ``domain_order = "mixed"``); its gradient target is one it
    supports and, for ``features``, one the network exposes."""
    w = weighting
    name = type(w).__name__
    if set(w.task_names) != set(tasks):
        raise ConfigError(f"weighting: built for tasks {w.task_names}, training has {list(tasks)}")
    if w.requires_grads not in (None, "shared"):
        raise ConfigError(f"weighting: requires_grads = {w.requires_grads!r} is not supported (None or 'shared')")
    mixed = domain_order == "mixed"
    if w.requires_grads == "shared" and many_to_many and not mixed:
        raise ConfigError(f"weighting: '{name}' is gradient-level (needs every task's gradient in one step); "
                          f"many-to-many batches hold one domain: set training.domain_order = \"mixed\" "
                          f"or use a loss-level weighting")
    target = getattr(w, "grad_target", "params")
    supported = tuple(getattr(w, "grad_targets", ("params",)))
    if target not in supported:
        raise ConfigError(f"weighting: '{name}' does not support grad_target = \"{target}\" "
                          f"(supported: {', '.join(supported)})")
    if target == "features":
        if mixed and many_to_many:
            raise ConfigError("weighting: grad_target = \"features\" needs every task on one batch; with "
                              "domain_order = \"mixed\" each domain has its own (use grad_target = \"params\")")
        if model is not None and getattr(model, "representation", None) is None:
            raise ConfigError(f"weighting: grad_target = \"features\" needs a network that exposes its shared "
                              f"representation; {type(model).__name__} does not (use grad_target = \"params\")")


def check_best_metric(best_metric: str | None, tasks: Mapping[str, Task]) -> bool | None:
    """``"task/metric"`` names a task and one of its metrics; returns higher_is_better (None: unset)."""
    if best_metric is None:
        return None
    task, metric = best_metric.split("/")
    if task not in tasks:
        raise ConfigError(f"training.best_metric: unknown task '{task}'{did_you_mean(task, tasks)} "
                          f"(tasks: {', '.join(tasks)})")
    known = type(tasks[task].metrics()).higher_is_better
    if metric not in known:
        raise ConfigError(f"training.best_metric: task '{task}' has no metric '{metric}'"
                          f"{did_you_mean(metric, known)} (metrics: {', '.join(known)})")
    return known[metric]


def missing_key(where: str, key: str, task: str | None = None, have: Any = ()) -> DataError:
    """The error for samples without ``key`` (the image, or the target of ``task``)."""
    of = f" (the target of task '{task}')" if task is not None else ""
    keys = [str(k) for k in have]
    carry = f"{did_you_mean(key, keys)} (samples carry: {', '.join(keys)})" if keys else ""
    return DataError(f"{where}: samples have no '{key}'{of}{carry}")


def check_samples(tasks: Mapping[str, Task], train_data: Any, val_data: Any) -> None:
    """Samples of every split (and domain) carry the image and their tasks' targets: the keys a
    data set lists in ``sample_keys``, else those of its first sample."""
    for where, data in (("train_data", train_data), ("evaluation data", val_data)):
        if data is None:
            continue
        items = data.items() if isinstance(data, Mapping) else [(None, data)]
        for domain, ds in items:
            if (domain is not None and domain not in tasks) or len(ds) == 0:
                continue  # check_data names these
            sample = getattr(ds, "sample_keys", None) or ds[0]
            if "image" not in sample:
                raise missing_key(where, "image", have=sample)
            for t in [domain] if domain is not None else list(tasks):
                if tasks[t].target not in sample:
                    raise missing_key(where, tasks[t].target, t, have=sample)


def check_precision(weighting: Weighting, precision: str) -> None:
    """fp16's loss scaling covers the engine's own backward paths (loss-level, and the
    default gradient-level one through StepContext); a weighting that owns its backward
    may take gradients the scaler does not know of, so fp16 is refused there."""
    if precision == "fp16" and type(weighting).backward is not Weighting.backward:
        raise ConfigError(f"weighting: {type(weighting).__name__} owns its backward step, which fp16 loss scaling "
                          f"does not cover; use training.precision = \"bf16\" (or \"fp32\")")
