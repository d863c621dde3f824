"""A finished (or interrupted) run's model, rebuilt from its recipe and loaded with its weights.

The one way ``mtlkit predict``, ``mtlkit plot`` and plugins' own tools (a test-server
submission) read a run back: the run folder's copy of the recipe is built through the one
build path (:func:`mtlkit.build.build_model`) and its checkpoint loaded into it, after the
same check ``mtlkit run --resume`` makes, so a checkpoint made with another recipe is a
one-line :class:`~mtlkit.errors.CheckpointError` naming it, not a silent mismatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .contracts import MultiTaskNetwork, Task
    from .recipe.loader import LoadedRecipe
    from .recipe.schema import Recipe


@dataclass
class LoadedRun:
    """A run's model in eval mode with its tasks, recipe and the checkpoint it came from."""

    run_dir: Path
    loaded: LoadedRecipe
    model: MultiTaskNetwork
    tasks: dict[str, Task]
    checkpoint: Path  # the checkpoint's meta JSON
    meta: dict[str, Any]

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    def data_refs(self) -> dict[str | None, Any]:
        """Data set references: ``{None: ref}`` (one-to-many: one data set for every task)
        or ``{task: ref}`` (many-to-many: each task's own)."""
        r = self.recipe
        if r.data is not None:
            return {None: r.data}
        return {t: spec.data for t, spec in r.tasks.items()}

    def dataset(self, task: str | None, split: str | None = None) -> Any:
        """The data set of ``task`` (None: the one-to-many data set) for ``split`` (default:
        its evaluation split, else its training split), built as training builds it."""
        from .build import build_dataset

        ref = self.data_refs()[task]
        where = "data" if task is None else f"tasks.{task}.data"
        return build_dataset(ref, where, split or ref.val_split or ref.train_split)


def load_run(run: str | os.PathLike, which: str = "best") -> LoadedRun:
    """The model of run folder ``run`` with its ``which`` checkpoint ("best": the best, else
    the last; "last"). Refuses a missing or foreign folder, a missing or damaged checkpoint,
    and a checkpoint whose recipe hash differs from the folder's recipe."""
    from .build import build_model
    from .engine.checkpoint import check_recipe, checkpoint_meta, load_model_weights, recipe_sha256
    from .recipe.loader import load_recipe
    from .rundir import check_run_dir
    from .runner import recipe_identity

    run_dir = check_run_dir(Path(run))
    meta, meta_path = checkpoint_meta(run_dir, which)
    loaded = load_recipe(run_dir / "recipe.toml")
    check_recipe(meta, recipe_sha256(recipe_identity(loaded.resolved)), str(meta_path))
    model, tasks = build_model(loaded.recipe)
    if loaded.recipe.model.freeze_shared:  # its frozen BatchNorm statistics stay the extractor's, as in training
        from .domains import freeze_shared

        freeze_shared(model)
    load_model_weights(model, meta_path)
    model.eval()
    return LoadedRun(run_dir=run_dir, loaded=loaded, model=model, tasks=tasks, checkpoint=meta_path, meta=meta)
