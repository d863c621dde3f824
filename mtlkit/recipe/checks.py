"""The loader's checks that look at more than one field: plugins before they are imported,
fields that must agree with each other, run and logger names that become files and folders."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError, did_you_mean
from ..rundir import folder_name_problem
from .schema import Recipe


def located(where: str, origin: Callable[[str], str | None], table: str, field: str, msg: str) -> str:
    """``where [table] field: msg``, named after the --set that wrote the field if one did."""
    source = origin(f"{table}.{field}")
    return f"{source}: [{table}] {field}: {msg}" if source else f"{where} [{table}] {field}: {msg}"


def plugin_list(raw: dict[str, Any], where: str, origin: Callable[[str], str | None]) -> list[str]:
    """The recipe's ``plugins``, checked to be a list of strings before any is imported."""
    plugins = raw.get("plugins", [])
    if plugins is None:
        return []
    source = origin("plugins")
    head = f"{source}: plugins" if source else f"{where} plugins"
    if not isinstance(plugins, list):
        raise ConfigError(f"{head}: expected a list of plugin modules or .py files, "
                          f"got {type(plugins).__name__} {plugins!r}")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, str) or not plugin.strip():
            raise ConfigError(f"{head}[{i}]: {plugin!r} is not a plugin module name or .py file "
                              f"(expected a non-empty string)")
    return plugins


def cross_checks(recipe: Recipe, where: str, origin: Callable[[str], str | None]) -> list[str]:
    errors = []
    tasks = list(recipe.tasks)
    with_data = [t for t, ref in recipe.tasks.items() if ref.data is not None]
    if recipe.data is None and len(with_data) != len(tasks):
        missing = [t for t in tasks if t not in with_data]
        errors.append(
            f"{where} [data] missing: give one [data] section (one-to-many) or a [tasks.<name>.data] "
            f"for every task (many-to-many); tasks without data: {', '.join(missing)}"
        )
    if recipe.data is not None and with_data:
        errors.append(f"{where} [tasks.{with_data[0]}.data]: not allowed together with a top-level [data] section")
    for t in recipe.model.heads:
        if t not in recipe.tasks:
            errors.append(located(where, origin, "model.heads", t, f"not a task{did_you_mean(t, tasks)}"))
    best = recipe.training.best_metric
    if best and best.split("/", 1)[0] not in recipe.tasks:
        task = best.split("/", 1)[0]
        errors.append(located(where, origin, "training", "best_metric", f"'{best}' must be 'task/metric' with a task "
                            f"of this recipe{did_you_mean(task, tasks)} (tasks: {', '.join(tasks)})"))
    for t in recipe.baselines:
        if t not in recipe.tasks:
            errors.append(located(where, origin, "baselines", t, f"not a task{did_you_mean(t, tasks)}"))
    for i, stage in enumerate(recipe.training.stages):
        for d in stage.domains or []:
            if recipe.data is not None:
                errors.append(f"{where} training.stages[{i}].domains: domain subsets apply to many-to-many "
                              f"recipes (a [tasks.<name>.data] per task) only")
                break
            if d not in recipe.tasks:
                errors.append(f"{where} training.stages[{i}].domains: '{d}' is not a task"
                              f"{did_you_mean(d, tasks)} (tasks: {', '.join(tasks)})")
    if recipe.training.train_on == "train+val":
        refs = [("data", recipe.data)] if recipe.data is not None else \
            [(f"tasks.{t}.data", r.data) for t, r in recipe.tasks.items() if r.data is not None]
        for location, ref in refs:
            if ref.val_split is None:
                errors.append(located(where, origin, "training", "train_on", f"'train+val' joins each data set's "
                                    f"val split to its train split, and [{location}] has none"))
    names = [ref.name for ref in recipe.loggers]
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append(located(where, origin, f"loggers.{i}", "name", f"logger '{name}' is listed twice"))
    if recipe.output.name:
        problem = folder_name_problem(recipe.output.name)
        if problem:
            errors.append(located(where, origin, "output", "name", problem))
    return errors


def logger_paths(resolved: dict[str, Any], where: str, origin: Callable[[str], str | None]) -> list[str]:
    """Two loggers must not write the same file or folder of the run folder (the loggers'
    own params models keep each one a plain name that is none of the run's own files)."""
    errors, taken, names = [], {}, set()
    for i, ref in enumerate(resolved.get("loggers") or []):
        name = ref.get("name") if isinstance(ref, dict) else None
        if name in names:
            continue  # a logger listed twice: cross_checks names that
        names.add(name)
        params = ref.get("params") if isinstance(ref, dict) else None
        for key, value in (params or {}).items():
            if key not in ("dir", "file") or not isinstance(value, str):
                continue
            here = f"loggers[{i}].params.{key}"
            other = taken.setdefault(value.casefold(), here)
            if other != here:
                source = origin(f"loggers.{i}.params.{key}")
                errors.append(f"{f'{source}:' if source else where} {here}: '{value}' is also written by {other}")
    return errors
