"""The Trainer: wiring and the epoch loop. One-to-many and many-to-many, loss- and
gradient-level weightings, exact resume, evaluation over whole splits, torchrun.

The concerns live next door: one step in :mod:`.step`, data order and seed streams in
:mod:`.sampling`, optimiser and schedule in :mod:`.optim`, stages (domains, optimiser, lr
per epoch) in :mod:`.stages`, evaluation in :mod:`.evaluation`, per-step values in
:mod:`.readout`, the log and results in :mod:`.runfiles`, Ctrl-C in :mod:`.signals`, the
trainer's state in checkpoints in :mod:`.snapshot`, their files in :mod:`.checkpoint`.

Data settings
-------------
- One-to-many: ``train_data`` is one Dataset whose samples carry every task's target;
  ``model(x)`` returns every task's output.
- Many-to-many: ``train_data`` is a dict domain (= task name) -> Dataset. Each batch comes
  from one domain and runs ``model(x, tasks=[domain])``. ``training.domain_order`` says how
  domains alternate. Gradient-level weightings need every task's loss in one step: with
  ``domain_order = "mixed"`` each step takes a batch of every domain (each through its own
  branch) and hands all their losses to the weighting; other orders refuse them.

The hot loop stays on the device
--------------------------------
Nothing in a loss-level step waits for the device: losses and weights stay tensors and
are read once per ``training.log_interval`` steps (log records are still one per step,
written in batches), where non-finite losses are also detected (the error names the first
bad step; no checkpoint is written after it, and the weights in memory may already be
non-finite). RNG states are captured only when a checkpoint is written.

Interrupts
----------
First Ctrl-C (or SIGTERM): the step in progress finishes, a checkpoint is saved, training
stops (KeyboardInterrupt). In one process this is checked after every step; under torchrun
the ranks agree at the next read-out, so up to ``log_interval`` more steps run (the
agreement is an all-reduce, not one per step). A second Ctrl-C stops at once: at a step
boundary the state is saved (it is exact); in the middle of a step (or of the epoch's
end: weighting hooks, evaluation, saving) nothing is saved and the last checkpoint stays.
Each epoch's batches are a pure function of (seed, epoch, rank, world size), so N steps
in one go and N/2 + resume + N/2 end with bit-identical weights on CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contracts import Task, Weighting
from ..errors import ConfigError, TrainingError
from . import distributed as D
from .checks import check_best_metric, check_data, check_precision, check_weighting
from .checkpoint import capture_rng, recipe_sha256
from .config import OptimizerConfig, ScheduleConfig, TrainingConfig, coerce
from .evaluation import delta_m, evaluate, improved_best
from .extra_batches import ExtraBatches
from .graph_step import GraphedStep, wants_graphs
from .loggers import Logger
from .precision import Precision, compiled, prepare_model
from .precision import resolve as resolve_auto
from .progress import ProgressReporter
from .readout import StepValues
from .runfiles import RunFiles
from .sampling import (Seeds, Stream, collate_by_domain, loader_batches, seed_everything, set_data_epoch,
                       train_dataset)
from .signals import StopSignals
from .snapshot import kept_note, restore_trainer, save_trainer
from .stages import Stages
from .step import TrainStep

__all__ = ["Trainer", "seed_everything"]


class Trainer:
    """Train a :class:`~mtlkit.contracts.MultiTaskNetwork` on one or several tasks.

    Parameters: ``model``; ``tasks`` (name -> Task); ``train_data`` (one Dataset, or a dict
    domain -> Dataset for many-to-many); ``val_data`` (same shape, optional); ``weighting``
    (default: equal weights, the sum of task losses); ``optimizer``, ``schedule``,
    ``training`` (config objects or dicts); ``run_dir`` (an existing folder to write logs,
    checkpoints and results to; None writes nothing); ``recipe`` (dict, hashed into
    checkpoints: resuming with a different recipe is refused); ``quiet`` (no live display);
    ``baselines`` (single-task results ``{task: {metric: value}}``: each evaluation then also
    reports Delta_m%, the mean signed relative change over the baselines' metrics);
    ``loggers`` (name -> :class:`~.loggers.Logger`, or a list: where records go besides
    ``log.jsonl``, which is always written).
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, Task], train_data, val_data=None,
                 weighting: Weighting | None = None, optimizer: OptimizerConfig | dict | None = None,
                 schedule: ScheduleConfig | dict | None = None, training: TrainingConfig | dict | None = None,
                 run_dir: str | os.PathLike | None = None, recipe: dict | None = None, quiet: bool = False,
                 baselines: Mapping[str, Mapping[str, float]] | None = None,
                 loggers: Mapping[str, Logger] | Sequence[Logger] | None = None) -> None:
        self.opt_cfg: OptimizerConfig = coerce(OptimizerConfig, optimizer, "optimizer")
        self.sched_cfg: ScheduleConfig = coerce(ScheduleConfig, schedule, "schedule")
        self.cfg: TrainingConfig = coerce(TrainingConfig, training, "training")
        self.tasks = dict(tasks)
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        self.baselines = {t: dict(v) for t, v in (baselines or {}).items()}
        unknown = [t for t in self.baselines if t not in self.tasks]
        if unknown:
            raise ConfigError(f"baselines: '{unknown[0]}' is not a task (tasks: {', '.join(self.tasks)})")
        self.many_to_many = isinstance(train_data, Mapping)
        self.train_data, self.val_data = train_data, val_data
        check_data(self.tasks, train_data, val_data, self.cfg)
        self.weighting = weighting if weighting is not None else Weighting(list(self.tasks))
        check_weighting(self.weighting, self.tasks, self.many_to_many, model, self.cfg.domain_order)
        self.best_higher = check_best_metric(self.cfg.best_metric, self.tasks)
        self.stages = Stages(self.cfg, self.opt_cfg, self.sched_cfg, train_data)

        self.ctx = D.setup(self.cfg.device)
        self.device = self.ctx.device
        self.cfg = resolve_auto(self.cfg, self.device)
        self.seeds = Seeds(self.cfg.seed)
        self.raw_model = model.to(self.device)
        self.weighting.to(self.device)
        prepare_model(self.raw_model, self.cfg, self.device)
        self.precision = Precision(self.cfg.precision, self.device)
        check_precision(self.weighting, self.cfg.precision)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             find_unused_parameters=self.many_to_many)  # one branch runs per many-to-many step
        else:
            self.model = self.raw_model
        self.model = compiled(self.model, self.cfg)  # DDP inside: compile sees its bucketing hooks
        # the step replayed as CUDA graphs (training.cuda_graph): the optimiser keeps its state on the device
        self.graphs = wants_graphs(self.cfg, self.weighting, self.device, self.ctx.enabled, self.many_to_many)
        self.optimizer, self.base_lrs = self.stages.start(self)  # the first stage's optimiser
        step = TrainStep(self.model, self.raw_model, self.tasks, self.weighting, self.optimizer, self.cfg, self.ctx,
                         ExtraBatches(train_data, val_data, self.cfg, self.ctx.rank), self.precision)
        self.train_step = GraphedStep(step, fallback_on_error=self.cfg.cuda_graph == "auto") if self.graphs else step

        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writes = self.run_dir is not None and self.ctx.is_main
        if self.writes and not self.run_dir.is_dir():
            raise ConfigError(f"run folder '{self.run_dir}' does not exist (the caller creates it)")
        self.files = RunFiles(self.run_dir, self.writes, loggers)
        self.recipe_hash = recipe_sha256(recipe)
        self.quiet = quiet
        self.reporter = ProgressReporter(self.cfg.epochs, self.cfg.log_interval, quiet=quiet,
                                         enabled=self.ctx.is_main)
        self.values = StepValues(self.ctx)

        # progress state (what a checkpoint stores)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.loss_sums: dict[str, float] = {}
        self.loss_counts: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0
        self._started = False
        self.stop = StopSignals()
        self._torn = False  # inside a step or an epoch's end: an exception there leaves no exact state
        self._saved_at: tuple[int, int] | None = None  # (epoch, global step) of the last checkpoint
        self._epoch_start_rng: dict[str, Any] | None = None  # before on_epoch_start (see _interrupt_rng)

    # -- public helpers ----------------------------------------------------------------------
    def lr_factor(self, epoch: int) -> float:
        """The schedule as a pure function of the epoch (exact on resume)."""
        return self.stages.lr_factor(epoch)

    def epoch_plan(self, epoch: int) -> list[tuple[str | None, list[tuple[int, int]]]]:
        """This rank's batches of ``epoch``: (domain or None, [(index, sample seed), ...]).

        Indices are into the training set (many-to-many: into the domains side by side).
        """
        return self.stages.plan(self.train_data, self.cfg, epoch, self.ctx.rank, self.ctx.world_size)

    def evaluate(self, split_data=None) -> dict[str, dict[str, float]]:
        """Metrics over a whole split ({task: {metric: value}}); default: the validation data.

        Under torchrun each rank evaluates indices rank, rank + world, ... (no padding, no
        sample twice) and the metric states are summed across ranks before ``compute``.
        """
        data = self.val_data if split_data is None else split_data
        if data is None:
            raise ConfigError("evaluate: no validation data given")
        return evaluate(self.raw_model, self.tasks, data, self.cfg, self.ctx, train_data=self.train_data)

    def delta_m(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """Delta_m% of ``metrics`` against ``self.baselines`` (their metrics, all tasks)."""
        return delta_m(self.tasks, self.baselines, metrics)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume_from: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
        """Train (continuing from ``resume_from``, a run folder or checkpoint, if given).

        Returns the final evaluation's metrics ({task: {metric: value}}), or, without
        validation data, each task's mean training loss of the last epoch as
        ``{task: {"train_loss": value}}``. Ctrl-C finishes the current step, saves
        ``checkpoints/last`` and re-raises KeyboardInterrupt.
        """
        if resume_from is not None:
            self._resume(resume_from)
        elif not self._started:
            seed_everything(self.seeds.for_(Stream.TRAINING, self.ctx.rank))
        self._started = True
        self._torn = False
        self.values = StepValues(self.ctx)  # nothing pending from an earlier, interrupted fit()
        self.files.open()
        self.stop.requested = False
        restore = self.stop.install()
        clock = (time.perf_counter(), self.elapsed)
        last_means: dict[str, float] = {}
        try:
            while self.epoch < self.cfg.epochs:
                last_means = self._run_epoch(clock)
        except KeyboardInterrupt:
            self.elapsed = clock[1] + time.perf_counter() - clock[0]
            self.reporter.close()
            self._on_interrupt()
            raise
        finally:
            restore()
            self.reporter.close()
            self.files.close()
        if self.history:
            return self.history[-1]["metrics"]
        return {t: {"train_loss": v} for t, v in last_means.items()}

    def _run_epoch(self, clock: tuple[float, float]) -> dict[str, float]:
        epoch = self.epoch
        if self.step_in_epoch == 0:
            self._epoch_start_rng = capture_rng()  # once an epoch: what a checkpoint before step 1 holds
            self.weighting.on_epoch_start(epoch)
        self.stages.enter(self, epoch)  # the epoch's stage: its optimiser and lr (mtlkit.engine.stages)
        set_data_epoch(self.train_data, epoch)
        plan = self.epoch_plan(epoch)
        start = min(self.step_in_epoch, len(plan))
        mixed = self.many_to_many and self.cfg.domain_order == "mixed"  # batches are {domain: batch}
        self.raw_model.train()
        self.weighting.train()
        self.reporter.start_epoch(epoch, len(plan), start)
        lr = self.optimizer.param_groups[0]["lr"]
        with loader_batches(train_dataset(self.train_data, mixed), self.cfg, self.device,
                            self.seeds.for_(Stream.LOADER, epoch), batch_sampler=[b for _, b in plan[start:]],
                            collate_fn=collate_by_domain if mixed else None) as batches:
            for i, batch in enumerate(batches, start):
                domain = plan[i][0]
                self._torn = True  # from the first kernel on, an exception leaves the state half-updated
                losses, weights = self.train_step(batch, domain, epoch, self.global_step)
                # commit the step: from here a checkpoint includes it
                self.step_in_epoch = i + 1
                self.global_step += 1
                self._torn = False
                self.values.add({"type": "step", "epoch": epoch + 1, "step": i + 1, "global_step": self.global_step,
                                 "domain": domain, "lr": lr, "time": time.time(),
                                 "elapsed": clock[1] + time.perf_counter() - clock[0]}, losses, weights)
                due = (i + 1) % self.cfg.log_interval == 0 or i + 1 == len(plan)
                shown = self._read_out() if due else None
                self.reporter.step(epoch, i + 1, shown, lr)
                # one process: stop after this step; torchrun: the ranks agreed in _read_out
                if self.stop.requested and (due or not self.ctx.enabled):
                    raise KeyboardInterrupt
        self._torn = True  # the epoch's end changes weighting state, counters and files together
        means = self._epoch_means()
        self.weighting.on_epoch_end(epoch, means)
        self.reporter.end_epoch(epoch, means)
        self.files.log([{"type": "epoch", "epoch": epoch + 1, "global_step": self.global_step, "losses": means,
                         "weights": self._weights_now(), "time": time.time()}])
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sums, self.loss_counts = {}, {}
        self.elapsed = clock[1] + time.perf_counter() - clock[0]
        stems = ["last"]
        if self.val_data is not None and (self.epoch % self.cfg.eval_interval == 0 or self.epoch == self.cfg.epochs):
            metrics = self.evaluate()
            record = {"epoch": self.epoch, "global_step": self.global_step, "metrics": metrics}
            shown = dict(metrics)
            if self.baselines:
                record["delta_m"] = self.delta_m(metrics)
                shown["Delta_m"] = {"% vs single-task": record["delta_m"]}
            self.history.append(record)
            self.files.log([{"type": "eval", **record, "time": time.time()}])
            self.files.log_images(self.raw_model, self.val_data, self.epoch, self.global_step)
            self.reporter.metrics(epoch, shown)
            best = improved_best(self.best, self.cfg.best_metric, self.best_higher, metrics, self.epoch,
                                 self.global_step)
            if best is not None:
                self.best = best
                stems.append("best")
        self._save(stems, capture_rng())
        self.files.write_results(self.epoch, self.global_step, self.history, self.best, self.cfg.metrics_last_n)
        self._epoch_start_rng = None
        self._torn = False
        # a stop asked for during the epoch's end: the checkpoint just written is the state
        if D.any_flag(self.stop.requested, self.ctx) and self.epoch < self.cfg.epochs:
            raise KeyboardInterrupt
        return means

    def _read_out(self) -> dict[str, float] | None:
        """Read the pending steps from the device (one sync): log them, add them to the
        epoch's sums; raise at the first non-finite loss. Returns the last step's losses."""
        records, stop, error = self.values.read(self.stop.requested)
        self.stop.requested = stop
        for r in records:
            for t, v in r["losses"].items():
                self.loss_sums[t] = self.loss_sums.get(t, 0.0) + v
                self.loss_counts[t] = self.loss_counts.get(t, 0) + 1
        self.files.log(records)
        if error is not None:
            self._torn = True  # the weights took the non-finite step: never save them
            raise TrainingError(error + kept_note(self))
        return records[-1]["losses"] if records else None

    def _weights_now(self) -> dict[str, float]:
        # the last step's weights when it left tasks out (gradient-level), else the weighting's
        w = self.train_step.subset_weights
        return {k: float(v) for k, v in (w if w is not None else self.weighting.weights()).items()}

    def _epoch_means(self) -> dict[str, float]:
        names = [t for t in self.tasks if t in self.loss_counts] if not self.ctx.enabled else list(self.tasks)
        if self.ctx.enabled:  # every rank must hand the weighting the same means
            buf = torch.tensor([[self.loss_sums.get(t, 0.0), float(self.loss_counts.get(t, 0))] for t in names],
                               dtype=torch.float64)
            buf = D.all_reduce_sum(buf, self.ctx).tolist()
            return {t: s / n for t, (s, n) in zip(names, buf) if n > 0}
        return {t: self.loss_sums[t] / self.loss_counts[t] for t in names}

    # -- interrupts --------------------------------------------------------------------------------
    def _on_interrupt(self) -> None:
        """Save what a KeyboardInterrupt left, if it is an exact state worth saving."""
        if self._torn:
            # no per-step copy of the buffers exists to undo a half-done step, so nothing is
            # saved; the last checkpoint is an exact earlier state
            if self.run_dir is not None:
                kept = f"global step {self._saved_at[1]}" if self._saved_at else "none was completed"
                self.reporter.message(f"interrupted in the middle of a step: no checkpoint saved "
                                      f"(the last one is kept: {kept})")
            return
        if self._saved_at != (self.epoch, self.global_step):  # else the last checkpoint is this state
            self._read_out()  # the pending steps' sums belong in the checkpoint
            self._save(["last"], self._interrupt_rng())
        if self.run_dir is not None:
            self.reporter.message(f"interrupted: saved checkpoint at epoch {self.epoch + 1} step "
                                  f"{self.step_in_epoch} (global step {self.global_step})")

    def _interrupt_rng(self) -> dict[str, Any]:
        """The RNG states that belong with the state at an interrupt. After a step: now
        (loading restores the RNGs it seeds; nothing else draws between steps). Before the
        epoch's first step: as before ``on_epoch_start``, which a resume calls again."""
        if self.step_in_epoch == 0 and self._epoch_start_rng is not None:
            return self._epoch_start_rng
        return capture_rng()

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, stems: list[str], rng: dict[str, Any]) -> None:
        """Write checkpoints (rank 0); every rank takes part (buffers, RNG states)."""
        if save_trainer(self, stems, rng):
            self._saved_at = (self.epoch, self.global_step)

    def _resume(self, path: str | os.PathLike) -> None:
        restore_trainer(self, path)
        self._saved_at = (self.epoch, self.global_step)
