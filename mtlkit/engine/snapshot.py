"""What a checkpoint holds of a Trainer: writing it (:func:`save_trainer`) and putting a
Trainer back into that state (:func:`restore_trainer`). The files themselves are
:mod:`.checkpoint`'s business; tensors and optimiser state by name are :mod:`.state`'s.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, TrainingError, os_reason
from . import distributed as D
from .checkpoint import (check_recipe, clean_checkpoints, load_checkpoint, remove_temp_files, rng_to_json,
                         save_checkpoint, set_rng_state)
from .sampling import Stream, seed_everything
from .state import pack_state, unpack_state

if TYPE_CHECKING:
    from .trainer import Trainer


def save_trainer(trainer: Trainer, stems: list[str], rng: dict[str, Any]) -> bool:
    """Commit the trainer's state as one checkpoint that the pointers ``stems`` name.

    Every rank takes part (rank 0's buffers, every rank's RNG states); rank 0 writes.
    ``rng``: the RNG states that go with the state (captured by the caller, which knows
    when). Refuses non-finite weights. Returns whether there is a run folder to save to.
    """
    t = trainer
    if t.run_dir is None:
        return False
    D.broadcast_buffers(t.raw_model, t.ctx)
    params = list(t.raw_model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist() if params else []
    if not all(finite):  # one read for all parameters; the name only when one is bad
        name = params[finite.index(False)][0]
        raise TrainingError(f"weights became non-finite ('{name}') by global step {t.global_step}"
                            f"{kept_note(t)}")
    rngs: list[Any] = [rng_to_json(rng)]
    if t.ctx.enabled:
        import torch.distributed as dist

        mine, rngs = rngs[0], [None] * t.ctx.world_size
        dist.all_gather_object(rngs, mine)  # in-process exchange, never a file
    if not t.writes:
        return True
    tensors, opt_meta = pack_state(t.raw_model, t.optimizer, t.weighting)
    meta = {
        "epoch": t.epoch, "step_in_epoch": t.step_in_epoch, "global_step": t.global_step,
        "world_size": t.ctx.world_size, "process_group": t.ctx.backend, "seed": t.cfg.seed,
        "loss_sums": t.loss_sums, "loss_counts": t.loss_counts,
        "rng": rngs, "weighting_state": t.weighting.get_state(),
        "schedule": {"name": t.sched_cfg.name, "base_lrs": t.base_lrs, "epoch": t.epoch,
                     "lr": [g["lr"] for g in t.optimizer.param_groups]},
        "optimizer": opt_meta, "recipe_sha256": t.recipe_hash,
        # the epoch's stage, and the stage whose (fresh) optimiser the state above belongs to
        "stage": t.stages.stage_of(t.epoch), "optimizer_stage": t.stages.active,
        "best": t.best, "history": t.history, "elapsed": t.elapsed,
        "torch_version": torch.__version__, "scaler": t.precision.state(),
    }
    try:
        save_checkpoint(t.run_dir / "checkpoints", tensors, meta, names=stems)  # one commit for all
    except OSError as exc:  # a full disk, a folder gone: the pointers still name the last whole one
        raise CheckpointError(f"{t.run_dir / 'checkpoints'}: saving the checkpoint of global step "
                              f"{t.global_step} failed ({os_reason(exc)}){kept_note(t)}") from None
    return True


def kept_note(trainer: Trainer) -> str:
    """The end of a failure's one-line error: the checkpoint a resume would start from."""
    if trainer.run_dir is None:
        return ""
    if trainer._saved_at is None:
        return "; no checkpoint had been saved yet"
    return f"; the last good checkpoint (global step {trainer._saved_at[1]}) is kept"


def restore_trainer(trainer: Trainer, path: str | os.PathLike) -> None:
    """Load the checkpoint ``path`` stands for into ``trainer``. Every check comes before
    the first change to the run folder: a refused resume leaves it as it was."""
    t = trainer
    meta, tensors, json_path = load_checkpoint(path)
    where = str(json_path)
    check_recipe(meta, t.recipe_hash, where)
    # the optimiser the checkpoint's state belongs to: that of the stage it was saved in
    stage = int(meta.get("optimizer_stage", 0))
    if not 0 <= stage < len(t.stages) or t.stages.owner[stage] != stage:
        raise CheckpointError(f"{where}: saved with the optimiser of stage {stage + 1}, which this run's "
                              f"training.stages do not start")
    t.precision.load_state(meta.get("scaler"), where)  # refuses before anything else changes
    optimizer = t.stages.build_optimizer(stage, t) if stage != t.stages.active else t.optimizer
    unpack_state(tensors, meta.get("optimizer", {}), t.raw_model, optimizer, t.weighting, where)
    if optimizer is not t.optimizer:
        t.stages.use(t, optimizer, stage)
    t.base_lrs = list(meta.get("schedule", {}).get("base_lrs", t.base_lrs))
    try:
        t.weighting.set_state(meta.get("weighting_state") or {})
        t.epoch = int(meta["epoch"])
        t.step_in_epoch = int(meta["step_in_epoch"])
        t.global_step = int(meta["global_step"])
        t.loss_sums = {k: float(v) for k, v in meta.get("loss_sums", {}).items()}
        t.loss_counts = {k: int(v) for k, v in meta.get("loss_counts", {}).items()}
        t.history = list(meta.get("history", []))
        t.best = meta.get("best")
        t.elapsed = float(meta.get("elapsed", 0.0))
        rngs = meta["rng"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: missing or bad field ({exc})") from None
    if meta.get("world_size", 1) == t.ctx.world_size:
        set_rng_state(rngs[t.ctx.rank])
    else:
        t.reporter.message(f"note: the run used {meta.get('world_size')} processes, now "
                           f"{t.ctx.world_size}: data order from here differs from an uninterrupted run")
        seed_everything(t.seeds.for_(Stream.RESEED_AFTER_WORLD_CHANGE, t.ctx.rank, t.global_step))
    if t.writes:  # every check passed: clear what a killed save left behind
        clean_checkpoints(t.run_dir / "checkpoints", keep=[json_path.parent])
        remove_temp_files(t.run_dir)
    t.files.truncate_log(t.global_step, t.epoch)
