"""What ``mtlkit run`` does before it writes anything, and all that ``mtlkit validate`` does:
build the recipe's parts and make every check that training would make, so that both
commands refuse the same recipes with the same messages."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Mapping

import torch

from .build import (Parts, build_data, build_loggers, build_model, build_weighting, check_parts,
                    sample_keeping_rng)
from .earlier_runs import check_baselines, init_from, resolve_baselines
from .engine.checks import check_best_metric, check_data, check_precision, check_samples, check_weighting
from .engine.distributed import env_world, launched, resolve_device
from .engine.graph_step import wants_graphs
from .engine.precision import resolve as resolve_auto
from .engine.stages import Stages
from .errors import ConfigError, DataError, MtlkitError, prefixed
from .recipe.loader import LoadedRecipe


def prepare(loaded: LoadedRecipe, meta: bool = False, init: bool = True,
            probe: bool = False, synthetic_hint: bool = True) -> tuple[Parts, dict[str, Any]]:
    """Build the parts and check them as the Trainer will: ``(parts, baselines)``.

    Checks: the model, tasks, weighting and data sets build (a missing data set gets the
    ``--synthetic`` hint); the Trainer's data, stage, weighting and best-metric checks; the
    first sample of every split is read and carries the image and its tasks' targets; the
    device exists; the weighting suits the precision and ``training.cuda_graph``; the
    baselines resolve; ``model.init_from`` loads into the model (when ``init``); the loggers
    build (into ``parts.loggers``).
    ``meta`` builds the model and weighting on the meta device (no memory, no weight
    init: what validate needs). ``synthetic_hint=False`` leaves the ``--synthetic`` hint out
    (the data fetch's check). Raises one MtlkitError listing every problem, one a line.
    """
    recipe = loaded.recipe
    where = str(loaded.path) if loaded.path is not None else "<recipe>"
    errors: list[MtlkitError] = []

    def attempt(fn: Callable[..., Any], *args: Any, prefix: str = "") -> Any:
        """``fn(*args)``, or None with its error kept (``prefix`` names where in the recipe it is)."""
        try:
            return fn(*args)
        except MtlkitError as exc:
            errors.append(prefixed(prefix, exc) if prefix else exc)
            return None

    trainer = f"{where}: "  # the Trainer's own messages name the setting (training.best_metric: ...)

    def build_network() -> tuple[Any, Any, Any]:
        model, tasks = attempt(build_model, recipe) or (None, None)
        weighting = attempt(build_weighting, recipe, tasks) if tasks is not None else None
        if init and model is not None and recipe.model.init_from is not None:
            attempt(init_from, model, recipe.model.init_from, prefix=f"{where} [model.init_from] path: ")
        return model, tasks, weighting

    try:
        with _meta_device() if meta else contextlib.nullcontext():
            model, tasks, weighting = build_network()
    except Exception:
        if not meta:
            raise
        del errors[:]  # a plugin that cannot be built on the meta device: build it for real
        model, tasks, weighting = build_network()
    try:
        train, val = build_data(recipe)
        data_built = True
    except MtlkitError as exc:
        errors.append(data_hint(loaded, exc) if synthetic_hint else exc)
        train = val = None
        data_built = False
    if tasks is not None:
        attempt(check_best_metric, recipe.training.best_metric, tasks, prefix=trainer)
        if weighting is not None:
            attempt(check_weighting, weighting, tasks, recipe.many_to_many, model, recipe.training.domain_order,
                    prefix=trainer)
        if data_built:
            n = len(errors)
            attempt(check_data, tasks, train, val, recipe.training, prefix=trainer)
            if len(errors) == n:
                attempt(Stages, recipe.training, recipe.optimizer, recipe.schedule, train, prefix=trainer)
            if len(errors) == n:
                attempt(check_samples, tasks, train, val, prefix=trainer)
            if len(errors) == n:
                # check_parts (probe) runs the model on the first training sample: read it once
                attempt(read_first_samples, None if probe and not meta else train, val)
    device = attempt(lambda: resolve_device(recipe.training.device, env_world()[2]), prefix=trainer)
    if weighting is not None:
        attempt(check_precision, weighting, recipe.training.precision, prefix=trainer)
        if device is not None:  # training.cuda_graph = "on" where graphs cannot run
            attempt(wants_graphs, resolve_auto(recipe.training, device), weighting, device, launched(),
                    recipe.many_to_many, prefix=trainer)
    baselines = attempt(resolve_baselines, recipe.baselines, loaded.path)
    if baselines and tasks is not None:
        attempt(check_baselines, baselines, tasks)
    loggers = attempt(build_loggers, recipe, prefix=f"{where} ")
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigError("\n".join(str(e) for e in errors))
    parts = Parts(model=model, tasks=tasks, weighting=weighting, train_data=train, val_data=val, loggers=loggers)
    if probe and not meta:
        check_parts(recipe, parts)
    return parts, baselines


def read_first_samples(train: Any, val: Any) -> None:
    """Read the first sample of every split (and domain), so that a file the data set's own
    checks refuse (a value range, a shape) fails now, not at the first evaluation."""
    for data in (train, val):
        for ds in (data.values() if isinstance(data, Mapping) else [data] if data is not None else []):
            if len(ds):
                sample_keeping_rng(ds, 0)


def data_hint(loaded: LoadedRecipe, exc: MtlkitError) -> MtlkitError:
    """Append the one flag that switches to synthetic data when the recipe offers it."""
    r = loaded.recipe
    has_stand_in = (r.data is not None and r.data.synthetic is not None) or any(
        t.data is not None and t.data.synthetic is not None for t in r.tasks.values()
    )
    if isinstance(exc, DataError) and has_stand_in:
        return DataError(f"{exc} (no data? run with --synthetic to use the built-in synthetic stand-in)")
    return exc


@contextlib.contextmanager
def _meta_device():
    """Modules built here hold no memory; loading weights into them checks names and shapes only."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "copying from a non-meta parameter ... is a no-op"
        yield
