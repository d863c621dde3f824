"""``mtlkit.run_recipe`` and ``mtlkit.build_trainer``: what ``mtlkit run`` does, in Python.

The steps, each only after the ones before succeeded:

1. load the recipe (to resume: first check the run folder's checkpoint, then load its
   copy of the recipe);
2. the cheap run-folder checks (taken, not writable), before anything is built;
3. :func:`mtlkit.preflight.prepare`: build and check model, tasks, weighting and data,
   resolve the baselines, load ``model.init_from``;
4. ``model.freeze_shared`` (before the Trainer wraps the model in DDP, which must see the
   final set of trainable parameters);
5. under torchrun every rank takes rank 0's run folder; rank 0 creates it and writes the
   resolved recipe into it;
6. the :class:`~mtlkit.engine.Trainer`.

A run folder created here is removed again when the run fails or is interrupted before
its first checkpoint, so a folder under ``runs/`` is always a run that can be resumed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import CheckpointError, ConfigError
from .rundir import (agree_on_run_dir, check_run_dir, check_run_files, create_run_dir, discard_unfinished,
                     is_rank_zero, new_run_dir, pin_for_run_folder, precheck_new_run_dir, read_results,
                     run_name, write_text_file)

if TYPE_CHECKING:  # the engine imports torch: only when a run is built
    from .engine import Trainer
    from .recipe.loader import LoadedRecipe

RecipeLike = Union[str, "os.PathLike[str]", "LoadedRecipe", None]
Overrides = Union[Iterable[str], Mapping[str, Any]]


@dataclass
class RunResult:
    """A finished run: its folder and the final evaluation (``{task: {metric: value}}``;
    without validation data, each task's last-epoch mean training loss)."""

    run_dir: Path
    metrics: dict[str, dict[str, float]]

    @property
    def results(self) -> dict[str, Any] | None:
        """The run's ``results.json`` (written by rank 0), or None where there is none."""
        path = self.run_dir / "results.json"
        return read_results(path) if path.is_file() else None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``removed`` says whether its run folder was removed again (no
    checkpoint yet); otherwise the last checkpoint in ``run_dir`` resumes it."""

    def __init__(self, run_dir: Path, removed: bool) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.removed = run_dir, removed


@dataclass
class BuiltRun:
    """A Trainer ready to fit, with its run folder (see :func:`build_trainer`)."""

    trainer: Trainer
    run_dir: Path
    loaded: LoadedRecipe
    resume_dir: Path | None  # the run folder it continues, or None for a new run
    created: Path | None  # the top-most folder this process created (removed if no checkpoint follows)

    def fit(self) -> RunResult:
        """Train; a failure or Ctrl-C before the first checkpoint removes the new run folder."""
        from .engine.distributed import shutdown

        try:
            metrics = self.trainer.fit(resume_from=self.resume_dir)
        except KeyboardInterrupt:
            raise RunInterrupted(self.run_dir, discard_unfinished(self.run_dir, self.created)) from None
        except BaseException:
            discard_unfinished(self.run_dir, self.created)
            raise
        finally:
            shutdown()
        return RunResult(self.run_dir, metrics)


def build_trainer(recipe: RecipeLike = None, *, overrides: Overrides = (), synthetic: bool = False,
                  run_dir: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
                  resume: str | os.PathLike | None = None, quiet: bool = True,
                  loggers: Iterable[str] = ()) -> BuiltRun:
    """Everything ``mtlkit run`` does before training; ``.fit()`` on the result trains.

    ``recipe``: a recipe file, a built-in recipe's name or a loaded recipe; ``overrides``:
    ``"key.path=value"`` strings (as ``--set``) or a mapping ``{"key.path": value}``;
    ``synthetic``: use the recipe's synthetic stand-in data; ``run_dir``: the exact new
    run folder, else ``runs_dir`` (default: the recipe's ``output.dir``)/NAME/<start time>;
    ``resume``: a run folder to continue instead of a recipe (overrides then apply to its
    recipe, e.g. more epochs); ``loggers``: names of loggers to add to the recipe's
    ``[[loggers]]`` (as ``--logger``). Every check is made before anything is written.
    """
    from .preflight import prepare

    check_arguments(recipe, synthetic=synthetic, run_dir=run_dir, runs_dir=runs_dir, resume=resume)
    loaded, resume_dir = _load(recipe, _override_list(overrides), synthetic, resume, list(loggers))
    spec = loaded.recipe
    if resume_dir is None:  # the cheap checks first: a taken or unwritable folder fails at once
        target = Path(run_dir) if run_dir is not None else new_run_dir(runs_dir or spec.output.dir, run_name(loaded))
        precheck_new_run_dir(target)
    else:
        target = resume_dir
    parts, baselines = prepare(loaded, init=resume_dir is None, probe=True)  # every check, before any write
    if spec.model.freeze_shared:
        from .domains import freeze_shared

        freeze_shared(parts.model)
    if resume_dir is None:
        pin_for_run_folder(loaded)  # before the recipe's hash is taken: a resume sees the same
    from .engine import Trainer
    from .engine.distributed import shutdown

    created = None
    try:
        if resume_dir is None:
            # Only now, with everything built and checked, does the run folder appear.
            target = agree_on_run_dir(target, spec.training.device)
            if is_rank_zero():
                created = create_run_dir(target)
                write_text_file(target / "recipe.toml", loaded.toml())
        trainer = Trainer(
            parts.model, parts.tasks, parts.train_data, parts.val_data, weighting=parts.weighting,
            optimizer=spec.optimizer, schedule=spec.schedule, training=spec.training, run_dir=target,
            recipe=recipe_identity(loaded.resolved), quiet=quiet, baselines=baselines,
            loggers=parts.loggers,
        )
        if resume_dir is not None and is_rank_zero():
            # every check has passed: a resume that extends training.epochs shows it in the folder
            recipe_path, text = target / "recipe.toml", loaded.toml()
            if recipe_path.read_text(encoding="utf-8") != text:
                write_text_file(recipe_path, text)
    except KeyboardInterrupt:
        removed = discard_unfinished(target, created)
        shutdown()
        raise RunInterrupted(target, removed) from None
    except BaseException:
        discard_unfinished(target, created)
        shutdown()
        raise
    return BuiltRun(trainer=trainer, run_dir=target, loaded=loaded, resume_dir=resume_dir, created=created)


def run_recipe(recipe: RecipeLike = None, *, overrides: Overrides = (), synthetic: bool = False,
               run_dir: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
               resume: str | os.PathLike | None = None, quiet: bool = True,
               loggers: Iterable[str] = ()) -> RunResult:
    """Train a recipe as ``mtlkit run`` does (same arguments as :func:`build_trainer`).

    >>> result = mtlkit.run_recipe("quickstart", overrides={"training.epochs": 1})  # doctest: +SKIP
    >>> result.run_dir, result.metrics["segmentation"]["miou"]  # doctest: +SKIP
    """
    built = build_trainer(recipe, overrides=overrides, synthetic=synthetic, run_dir=run_dir, runs_dir=runs_dir,
                          resume=resume, quiet=quiet, loggers=loggers)
    return built.fit()


def recipe_identity(resolved: dict) -> dict:
    """What a checkpoint's recipe hash covers: everything but ``training.epochs`` and the
    loggers, so that a resumed run may be extended or logged elsewhere, while any other
    change is refused."""
    ident = copy.deepcopy(resolved)
    ident.get("training", {}).pop("epochs", None)
    ident.pop("loggers", None)
    return ident


def check_arguments(recipe: RecipeLike, *, synthetic: bool, run_dir, runs_dir, resume) -> None:
    """Refuse arguments that contradict each other (one of them would be silently ignored)."""
    if resume is not None:
        name = getattr(recipe, "name", recipe)
        for given, flag, why in (
                (recipe, f"RECIPE '{name}'", "a resumed run uses its own recipe.toml; --set still applies to it"),
                (run_dir, f"--run-dir {run_dir}", "a resumed run continues in its own folder"),
                (runs_dir, f"--runs-dir {runs_dir}", "a resumed run continues in its own folder"),
                (synthetic or None, "--synthetic", "a resumed run keeps the data its recipe.toml names")):
            if given is not None:
                raise ConfigError(f"run: {flag} and --resume {resume}: give one, not both ({why})")
    if run_dir is not None and runs_dir is not None:
        raise ConfigError(f"run: --run-dir {run_dir} and --runs-dir {runs_dir}: give one, not both (--run-dir is "
                          f"the exact run folder, --runs-dir the folder a new run folder is made in)")


def _override_list(overrides: Overrides) -> list[str]:
    if isinstance(overrides, Mapping):
        from .recipe.toml_writer import toml_value

        return [f"{key}={toml_value(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):  # one override, not its characters
        return [overrides]
    return list(overrides)


def _load(recipe: RecipeLike, overrides: list[str], synthetic: bool, resume: str | os.PathLike | None,
          loggers: list[str]) -> tuple[LoadedRecipe, Path | None]:
    from .recipe.loader import LoadedRecipe, load_recipe

    if resume is None:
        if recipe is None:
            raise ConfigError("run: give a RECIPE (or --resume RUN_DIR)")
        if isinstance(recipe, LoadedRecipe):
            if overrides or synthetic or loggers:
                raise ConfigError("run: overrides, synthetic and loggers apply to a recipe file or name, "
                                  "not to an already loaded recipe")
            return recipe, None
        return load_recipe(recipe, overrides=overrides, synthetic=synthetic, loggers=loggers), None
    from .engine.checkpoint import check_recipe, checkpoint_meta, recipe_sha256

    # Every check before the first write: a refused resume leaves the run folder as it was.
    resume_dir = check_run_dir(Path(resume))
    meta, meta_path = checkpoint_meta(resume_dir)  # missing, truncated or foreign: refused
    loaded = load_recipe(resume_dir / "recipe.toml", overrides=overrides, loggers=loggers)
    check_recipe(meta, recipe_sha256(recipe_identity(loaded.resolved)), str(meta_path))
    check_epochs(meta, loaded.recipe.training.epochs, meta_path)
    check_writable(resume_dir)
    return loaded, resume_dir


def check_epochs(meta: dict, epochs: int, meta_path: Path) -> None:
    """A resume may extend ``training.epochs`` (or keep it), never cut it below the epochs
    its checkpoint has already trained (the recipe.toml would then disagree with the run)."""
    done = meta.get("epoch")
    if isinstance(done, int) and not isinstance(done, bool) and epochs < done:
        raise ConfigError(f"{meta_path}: training.epochs = {epochs}: the run has already trained {done} "
                          f"epochs; give {done} or more")


def check_writable(run: Path) -> None:
    """A resumed run replaces files in the run and checkpoints folders and appends to the
    log: each must be what it should be (:func:`~mtlkit.rundir.check_run_files`) and writable."""
    check_run_files(run)
    for p in (run, run / "checkpoints", run / "log.jsonl"):
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise CheckpointError(f"{p}: not writable (resuming writes checkpoints and logs there)")
