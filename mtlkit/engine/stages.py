"""Training in stages (``[[training.stages]]``): epochs, a domain subset and, optionally, a
fresh optimiser and schedule per stage.

The Visual Decathlon's reference protocol is two stages: 300 epochs on all ten domains
with SGD 0.1 and StepLR(50, 0.5), then 100 epochs on the nine other than imagenet12 with a
fresh SGD at 0.01 and StepLR(50, 0.5)::

    [[training.stages]]
    epochs = 300

    [[training.stages]]
    epochs = 100
    domains = ["aircraft", "cifar100", ...]
    optimizer = { name = "sgd", lr = 0.01, momentum = 0.9, nesterov = true, weight_decay = 5e-5 }
    schedule = { name = "step", step_size = 50, gamma = 0.5 }

Rules
-----
- Stages run in order. ``training.epochs`` defaults to their sum; set (``--set
  training.epochs=2`` for a quick try, or more to extend a finished run), it is the run's
  length all the same: the run stops early, or its last stage goes on.
- A stage's ``domains`` (many-to-many only) are the domains its epochs train on; each
  epoch's batches are the same function of (seed, epoch, rank, world size) as without
  stages, drawn over those domains (in the data's order). Evaluation covers every domain.
- A stage with an ``optimizer`` starts a fresh optimiser (no momentum carried over) with
  those settings. The first stage without one uses the recipe's ``[optimizer]``; a later
  stage without one keeps the optimiser it finds, state and all.
- The schedule restarts at every stage with an ``optimizer`` or a ``schedule``: the
  stage's ``schedule``, else the one in force before, counted from the stage's first
  epoch; cosine decays to 0 over the epochs until the next restart (or the end). A stage
  with neither continues the schedule before it (epochs keep counting).
- Checkpoints record the stage and which stage's optimiser they hold; a run resumed in a
  stage gets that stage's optimiser back (:mod:`.snapshot`), so a resume across a stage
  boundary is as exact as within one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError, did_you_mean
from .config import OptimizerConfig, ScheduleConfig, StageConfig, TrainingConfig
from .optim import apply_lr, build_optimizer, lr_factor
from .sampling import Plan, epoch_plan

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass(frozen=True)
class _Restart:
    """A stretch of epochs [start, end) under one schedule (it restarts at ``start``)."""

    start: int
    end: int
    schedule: ScheduleConfig


class Stages:
    """The stages of a run: which one an epoch belongs to, its domains, optimiser and lr."""

    def __init__(self, cfg: TrainingConfig, optimizer: OptimizerConfig, schedule: ScheduleConfig,
                 train_data) -> None:
        domains = list(train_data) if isinstance(train_data, Mapping) else None
        self.active = 0  # the stage whose optimiser the trainer holds
        self.stages: list[StageConfig] = list(cfg.stages) or [StageConfig(epochs=cfg.epochs)]
        for i, st in enumerate(self.stages):
            for d in st.domains or []:
                if domains is None:
                    raise ConfigError(f"training.stages[{i}].domains: domain subsets apply to many-to-many "
                                      f"data (a dict of domains) only")
                if d not in domains:
                    raise ConfigError(f"training.stages[{i}].domains: '{d}' is not a domain of the training "
                                      f"data{did_you_mean(d, domains)} (domains: {', '.join(domains)})")
        self.starts = np.cumsum([0] + [st.epochs for st in self.stages]).tolist()
        self.total = self.starts[-1]
        self.optimizers: list[OptimizerConfig] = []
        self.owner: list[int] = []  # the stage whose optimiser stage i trains with
        restarts: list[tuple[int, ScheduleConfig]] = []
        for i, st in enumerate(self.stages):
            fresh = i == 0 or st.optimizer is not None
            self.optimizers.append(st.optimizer or (optimizer if i == 0 else self.optimizers[-1]))
            self.owner.append(i if fresh else self.owner[-1])
            if fresh or st.schedule is not None:
                restarts.append((self.starts[i], st.schedule or (restarts[-1][1] if restarts else schedule)))
        ends = [s for s, _ in restarts[1:]] + [self.total]
        self.restarts = [_Restart(s, e, sc) for (s, sc), e in zip(restarts, ends)]

    def __len__(self) -> int:
        return len(self.stages)

    def stage_of(self, epoch: int) -> int:
        """The stage ``epoch`` (0-based) belongs to (the last one for epochs past the end)."""
        for i in range(len(self.stages)):
            if epoch < self.starts[i + 1]:
                return i
        return len(self.stages) - 1

    def domains(self, epoch: int) -> list[str] | None:
        """The domains ``epoch`` trains on (None: all)."""
        return self.stages[self.stage_of(epoch)].domains

    def optimizer_stage(self, epoch: int) -> int:
        """The stage whose optimiser ``epoch`` trains with."""
        return self.owner[self.stage_of(epoch)]

    def lr_factor(self, epoch: int) -> float:
        """The schedule as a pure function of the epoch (exact on resume)."""
        r = next((r for r in reversed(self.restarts) if r.start <= epoch), self.restarts[0])
        return lr_factor(r.schedule, r.end - r.start, epoch - r.start)

    def plan(self, train_data, cfg: TrainingConfig, epoch: int, rank: int, world: int) -> Plan:
        """This rank's batches of ``epoch`` over the stage's domains; indices are into the
        training set with every domain side by side, as without stages."""
        domains = self.domains(epoch)
        if domains is None or not isinstance(train_data, Mapping) or set(domains) == set(train_data):
            return epoch_plan(train_data, cfg, epoch, rank, world)
        names = list(train_data)
        offsets = dict(zip(names, np.cumsum([0] + [len(train_data[d]) for d in names]).tolist()))
        subset = {d: train_data[d] for d in names if d in domains}
        local = dict(zip(subset, np.cumsum([0] + [len(ds) for ds in subset.values()]).tolist()))
        return [(d, [(i - local[d] + offsets[d], seed) for i, seed in batch])
                for d, batch in epoch_plan(subset, cfg, epoch, rank, world)]

    def build_optimizer(self, stage: int, trainer: Trainer) -> torch.optim.Optimizer:
        """A fresh optimiser with the settings of ``stage``'s optimiser."""
        return build_optimizer(self.optimizers[self.owner[stage]], trainer.raw_model, trainer.weighting,
                               capturable=trainer.graphs)

    def start(self, trainer: Trainer) -> tuple[torch.optim.Optimizer, list[float]]:
        """The first stage's optimiser and its base learning rates (the trainer's constructor)."""
        optimizer = self.build_optimizer(0, trainer)
        self.active = 0
        return optimizer, [g["lr"] for g in optimizer.param_groups]

    def enter(self, trainer: Trainer, epoch: int) -> None:
        """Before ``epoch`` runs (or resumes): the optimiser of its stage (fresh where the stage
        starts one) and the epoch's learning rate."""
        stage = self.stage_of(epoch)
        if self.owner[stage] != self.active:
            self.use(trainer, self.build_optimizer(stage, trainer), self.owner[stage])
        if len(self.stages) > 1 and epoch == self.starts[stage] and trainer.step_in_epoch == 0:
            st = self.stages[stage]
            fresh = "a fresh optimiser, " if self.owner[stage] == stage and stage > 0 else ""
            trainer.reporter.message(f"stage {stage + 1}/{len(self.stages)}: epochs {epoch + 1}-"
                                     f"{self.starts[stage + 1]}, {fresh}domains: "
                                     f"{', '.join(st.domains) if st.domains else 'all'}")
        apply_lr(trainer.optimizer, trainer.base_lrs, self.lr_factor(epoch))

    def use(self, trainer: Trainer, optimizer: torch.optim.Optimizer, stage: int) -> None:
        """Make ``optimizer`` (of ``stage``'s settings) the one the trainer steps with."""
        trainer.optimizer = optimizer
        trainer.base_lrs = [g["lr"] for g in optimizer.param_groups]
        trainer.train_step.optimizer = optimizer
        self.active = stage
