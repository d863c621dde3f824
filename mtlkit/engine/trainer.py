"""The training loop: one-to-many and many-to-many, loss- and gradient-level weightings,
exact resume, evaluation over whole splits, torchrun.

Data settings
-------------
- One-to-many: ``train_data`` is one Dataset whose samples carry every task's target;
  ``model(x)`` returns every task's output.
- Many-to-many: ``train_data`` is a dict domain (= task name) -> Dataset. Each batch comes
  from one domain and runs ``model(x, tasks=[domain])``. ``training.domain_order`` says how
  domains alternate. Gradient-level weightings (``requires_grads = "shared"``) need every
  task's loss on the same batch, which a one-domain batch never has, so they are refused
  here (ConfigError naming ``weighting``).

Reproducibility
---------------
Each epoch's batches are a pure function of (seed, epoch, rank, world size): see
:meth:`Trainer.epoch_plan`. Each sample is loaded with the global RNGs seeded from its own
seed (augmentations repeat whatever ``num_workers`` is, and on resume); in the main process
the training RNG stream (dropout) is kept apart from data loading. Checkpoints store the
RNG states after the last completed step, so N steps in one go and N/2 + resume + N/2
end with bit-identical weights on CPU.

Distributed (torchrun)
----------------------
The model is wrapped in DistributedDataParallel (``find_unused_parameters`` in the
many-to-many setting, where one branch runs per step). Parameters of the weighting
(outside DDP) get their gradients averaged by hand. Gradient-level weightings run the
forward under ``model.no_sync()`` and compute every gradient with ``torch.autograd.grad``
(no DDP reducer involved); the K x P per-task gradient matrix, the task losses and the
task-specific gradients are averaged across ranks by all-reduce before ``combine_grads``,
so every rank's weighting sees the same values and applies the same update. Tasks with no
valid target in the batch (a zero gradient row) are left out of ``combine_grads``. Rank 0
alone writes files and prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from ..contracts import Task, Weighting
from ..errors import CheckpointError, ConfigError, TrainingError
from . import distributed as D
from .checks import check_best_metric, check_data, check_weighting, missing_key
from .checkpoint import (atomic_write_json, capture_rng, load_checkpoint, pack_state, recipe_sha256,
                         rng_to_json, save_checkpoint, set_rng_state, unpack_state)
from .config import OptimizerConfig, ScheduleConfig, TrainingConfig, coerce
from .progress import ProgressReporter


# -- seeding ----------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: stable across platforms)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random (call before building the model)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C is the main process's business: it finishes the step, saves and shuts the
    # workers down; a worker dying on SIGINT would turn that into a DataLoader error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # DataLoader seeds torch per worker from its (seeded) generator; numpy and random follow.
    s = torch.initial_seed()
    np.random.seed(s % 2**32)
    random.seed(s)


def _seed_data_rngs(seed: int) -> None:
    # CPU generator only: torch.manual_seed would also reseed CUDA, the dropout stream on GPU.
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _SeededSamples(Dataset):
    """``dataset[index]`` with the global RNGs seeded from the sample's own seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if get_worker_info() is not None:  # a worker's RNG serves data loading only
            _seed_data_rngs(seed)
            return self.dataset[index]
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            _seed_data_rngs(seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class _Concat(Dataset):
    """Domains side by side (global index = domain offset + local index)."""

    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) for d in datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int):
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.datasets[d][index - self.offsets[d]]


def _shard_permutation(n: int, seed: int, rank: int, world: int) -> list[int]:
    """DistributedSampler(shuffle=True) semantics: permute, pad by wrapping, take rank::world."""
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    if world > 1:
        total = math.ceil(n / world) * world
        while len(perm) < total:
            perm += perm[: total - len(perm)]
        perm = perm[rank:total:world]
    return perm


def _chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[i:i + size] for i in range(0, len(indices), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


# -- the trainer ---------------------------------------------------------------------------
class Trainer:
    """Train a :class:`~mtlkit.contracts.MultiTaskNetwork` on one or several tasks.

    Parameters: ``model``; ``tasks`` (name -> Task); ``train_data`` (one Dataset, or a dict
    domain -> Dataset for many-to-many); ``val_data`` (same shape, optional); ``weighting``
    (default: equal weights, the sum of task losses); ``optimizer``, ``schedule``,
    ``training`` (config objects or dicts); ``run_dir`` (an existing folder to write logs,
    checkpoints and results to; None writes nothing); ``recipe`` (dict, hashed into
    checkpoints: resuming with a different recipe is refused); ``quiet`` (no live display);
    ``baselines`` (single-task results ``{task: {metric: value}}``: each evaluation then also
    reports Delta_m%, the mean signed relative change over the baselines' metrics).
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, Task], train_data, val_data=None,
                 weighting: Weighting | None = None, optimizer: OptimizerConfig | dict | None = None,
                 schedule: ScheduleConfig | dict | None = None, training: TrainingConfig | dict | None = None,
                 run_dir: str | os.PathLike | None = None, recipe: dict | None = None, quiet: bool = False,
                 baselines: Mapping[str, Mapping[str, float]] | None = None) -> None:
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
        self.train_data = train_data
        self.val_data = val_data
        self._check_data()
        self.weighting = weighting if weighting is not None else Weighting(list(self.tasks))
        self._check_weighting()
        self._check_best_metric()

        self.ctx = D.setup(self.cfg.device)
        self.device = self.ctx.device
        self.raw_model = model.to(self.device)
        self.weighting.to(self.device)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             find_unused_parameters=self.many_to_many)
        else:
            self.model = self.raw_model
        self.optimizer = self._build_optimizer()
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writes = self.run_dir is not None and self.ctx.is_main
        if self.writes and not self.run_dir.is_dir():
            raise ConfigError(f"run folder '{self.run_dir}' does not exist (the caller creates it)")
        self.recipe_hash = recipe_sha256(recipe)
        self.quiet = quiet
        self.reporter = ProgressReporter(self.cfg.epochs, self.cfg.log_interval, quiet=quiet,
                                         enabled=self.ctx.is_main)

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
        self._committed_rng: dict[str, Any] | None = None
        self._stop_requested = False
        self._log_fh = None
        self._phase = "idle"  # idle | forward | update: where a KeyboardInterrupt landed
        self._buffer_snapshot: list[Tensor] = []

    # -- validation ----------------------------------------------------------------------
    def _check_data(self) -> None:
        check_data(self.tasks, self.train_data, self.val_data, self.cfg)

    def _check_weighting(self) -> None:
        check_weighting(self.weighting, self.tasks, self.many_to_many)

    def _check_best_metric(self) -> None:
        self.best_higher = check_best_metric(self.cfg.best_metric, self.tasks)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.opt_cfg
        groups = [{"params": [p for p in self.raw_model.parameters() if p.requires_grad]}]
        wparams = [p for p in self.weighting.parameters() if p.requires_grad]
        if wparams:  # weighting parameters (log-variances...) are not weights to shrink
            groups.append({"params": wparams, "weight_decay": 0.0})
        if c.name == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                   weight_decay=c.weight_decay)
        cls = torch.optim.Adam if c.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)

    # -- schedule --------------------------------------------------------------------------
    def lr_factor(self, epoch: int) -> float:
        """The schedule as a pure function of the epoch (exact on resume)."""
        s = self.sched_cfg
        if s.name == "step":
            return s.gamma ** (epoch // s.step_size)
        if s.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.cfg.epochs))
        return 1.0

    def _apply_lr(self, epoch: int) -> None:
        f = self.lr_factor(epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    # -- data order --------------------------------------------------------------------------
    def _domains(self) -> list[str]:
        return list(self.train_data) if self.many_to_many else []

    def _batch_size(self, domain: str | None) -> int:
        return self.cfg.domain_batch_size.get(domain, self.cfg.batch_size) if domain else self.cfg.batch_size

    def epoch_plan(self, epoch: int) -> list[tuple[str | None, list[tuple[int, int]]]]:
        """This rank's batches of ``epoch``: (domain or None, [(index, sample seed), ...]).

        Indices are into the training set (many-to-many: into the domains side by side).
        """
        c, rank, world = self.cfg, self.ctx.rank, self.ctx.world_size
        plan: list[tuple[str | None, list[int]]] = []
        if not self.many_to_many:
            perm = _shard_permutation(len(self.train_data), derive_seed(c.seed, epoch, 0, 0), rank, world)
            plan = [(None, b) for b in _chunks(perm, c.batch_size, c.drop_last)]
        else:
            domains = self._domains()
            sizes = [len(self.train_data[d]) for d in domains]
            offsets = np.cumsum([0] + sizes).tolist()

            def passes(i: int):
                """Endless batches of domain i: pass after pass, each freshly shuffled."""
                r = 0
                while True:
                    perm = _shard_permutation(sizes[i], derive_seed(c.seed, epoch, i + 1, r), rank, world)
                    batches = _chunks([offsets[i] + j for j in perm], self._batch_size(domains[i]), c.drop_last)
                    if not batches:
                        return
                    yield from batches
                    r += 1

            per_pass = [len(_chunks(list(range(math.ceil(n / world))), self._batch_size(d), c.drop_last))
                        for n, d in zip(sizes, domains)]
            if c.domain_order == "sequential":
                for i, d in enumerate(domains):
                    it = passes(i)
                    plan += [(d, next(it)) for _ in range(per_pass[i])]
            elif c.domain_order == "round_robin":
                its = [passes(i) for i in range(len(domains))]
                for k in range(max(per_pass)):
                    plan += [(d, next(its[i])) for i, d in enumerate(domains) if k < per_pass[i]]
            else:  # proportional: as many batches as one pass over all; domain drawn by size^(1/T)
                w = np.array(sizes, dtype=np.float64) ** (1.0 / c.proportional_temperature)
                rng = np.random.Generator(np.random.PCG64(derive_seed(c.seed, epoch, 0, 1)))
                picks = rng.choice(len(domains), size=sum(per_pass), p=w / w.sum())
                its = [passes(i) for i in range(len(domains))]
                plan = [(domains[i], next(its[i])) for i in picks.tolist() if per_pass[i] > 0]
        if c.max_steps_per_epoch is not None:
            plan = plan[: c.max_steps_per_epoch]
        total = sum(len(b) for _, b in plan)
        rng = np.random.Generator(np.random.PCG64(derive_seed(c.seed, epoch, rank, 2)))
        seeds = rng.integers(0, 2**62, size=total).tolist()
        out, k = [], 0
        for d, b in plan:
            out.append((d, list(zip(b, seeds[k:k + len(b)]))))
            k += len(b)
        return out

    def _set_data_epoch(self, epoch: int) -> None:
        """Tell data sets with their own seeded augmentation (``set_epoch``) which epoch this is.

        Such a data set draws its crops and flips from (its seed, epoch, index): without this
        call every epoch would see the same ones. Called before the epoch's loader is made,
        so worker processes get the data set with the epoch already set.
        """
        datasets = self.train_data.values() if self.many_to_many else [self.train_data]
        for ds in datasets:
            if callable(getattr(ds, "set_epoch", None)):
                ds.set_epoch(epoch)

    def _train_dataset(self) -> Dataset:
        if self.many_to_many:
            return _SeededSamples(_Concat([self.train_data[d] for d in self._domains()]))
        return _SeededSamples(self.train_data)

    def _loader(self, dataset: Dataset, batch_sampler, seed: int) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda", worker_init_fn=_seed_worker,
                          generator=torch.Generator().manual_seed(seed))

    # -- one step -------------------------------------------------------------------------------
    def _targets(self, batch: dict, names: list[str], where: str) -> dict[str, Tensor]:
        out = {}
        for t in names:
            key = self.tasks[t].target
            if key not in batch:
                raise missing_key(where, key, t, batch)
            out[t] = batch[key].to(self.device, non_blocking=True)
        return out

    def _forward(self, model: nn.Module, batch: dict, domain: str | None, where: str) -> dict[str, Tensor]:
        if "image" not in batch:
            raise missing_key(where, "image", have=batch)
        x = batch["image"].to(self.device, non_blocking=True)
        out = model(x, tasks=[domain]) if domain is not None else model(x)
        names = [domain] if domain is not None else list(self.tasks)
        for t in names:
            if t not in out:
                raise TrainingError(f"the model returned no output for task '{t}'")
        return out

    def _train_step(self, batch: dict, domain: str | None) -> dict[str, float]:
        names = [domain] if domain is not None else list(self.tasks)
        gradient_level = self.weighting.requires_grads == "shared"
        sync_ctx = self.model.no_sync() if gradient_level and self.ctx.enabled else contextlib.nullcontext()
        with sync_ctx:
            out = self._forward(self.model, batch, domain, "train_data")
            targets = self._targets(batch, names, "train_data")
            losses = {t: self.tasks[t].loss(out[t], targets[t]) for t in names}
            values = {t: float(losses[t].detach()) for t in names}
            bad = [not math.isfinite(values[t]) for t in names]
            if self.ctx.enabled:
                bad = (D.all_reduce_sum(torch.tensor(bad, dtype=torch.float32), self.ctx) > 0).tolist()
            if any(bad):
                t = names[bad.index(True)]
                raise TrainingError(f"task '{t}': loss is {values[t]} at epoch {self.epoch + 1} step "
                                    f"{self.step_in_epoch + 1} (global step {self.global_step + 1}); "
                                    f"the last good checkpoint is kept")
            if domain is not None:
                wt = self.cfg.domain_loss_weight.get(domain, 1.0)
                losses = {domain: losses[domain] * wt} if wt != 1.0 else losses
            self.optimizer.zero_grad(set_to_none=True)
            self._phase = "update"  # from here an interrupt tears the state
            if gradient_level:
                self._gradient_level_backward(losses)
            else:
                self.weighting.combine(losses).backward()
                self._average_grads([p for p in self.weighting.parameters() if p.grad is not None])
            self.optimizer.step()
        return values

    def _average_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients DDP does not see (one flat all-reduce)."""
        if not self.ctx.enabled or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        D.all_reduce_mean_(flat, self.ctx)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _gradient_level_backward(self, losses: dict[str, Tensor]) -> None:
        """Shared parameters: ``combine_grads`` of the global batch; the rest: ``combine``.

        Everything the weighting reads is averaged across ranks first, the K x P gradient
        matrix and the K task losses alike: with a rank's own losses (MGDA's loss
        normalisation) the ranks would choose different weights and the replicas drift.
        """
        model = self.raw_model
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        if not shared:
            raise ConfigError("weighting: gradient-level weighting needs shared parameters, the model has none")
        shared_ids = {id(p) for p in shared}
        names = list(self.weighting.task_names)
        rows = []
        for t in names:
            grads = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, shared)]))
        G = torch.stack(rows)  # K x P
        D.all_reduce_mean_(G, self.ctx)
        # float64 carries any task's loss dtype exactly; each goes back to its own dtype
        mean = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in names])
        D.all_reduce_mean_(mean, self.ctx)
        global_losses = {t: mean[k].to(losses[t].dtype) for k, t in enumerate(names)}
        combined = self._combine_present(G, global_losses)
        offset = 0
        for p in shared:
            n = p.numel()
            # no task to learn from: no gradient, so the optimiser leaves the trunk alone
            # (a zero gradient would still move it by momentum and weight decay)
            p.grad = None if combined is None else combined[offset:offset + n].detach().view_as(p).clone()
            offset += n
        private = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        private += [p for p in self.weighting.parameters() if p.requires_grad]
        if private:
            grads = torch.autograd.grad(self.weighting.combine(losses), private, allow_unused=True)
            used = []
            for p, g in zip(private, grads):
                if g is not None:
                    p.grad = g.detach().clone()
                    used.append(p)
            self._average_grads(used)

    def _combine_present(self, G: Tensor, losses: dict[str, Tensor]) -> Tensor | None:
        """``combine_grads`` over the tasks whose gradient row is not zero (None: no such task).

        A task with no valid target in the batch (every label ignored, every depth 0) has a
        zero loss and a zero row. Left in, it decides the aggregate: the min-norm point of
        a hull holding 0 is 0 (MGDA), IMTL-G puts all the weight on it; the trunk stops.
        Such tasks are left out and the weighting solves for the others: during the call
        its ``task_names`` lists the present tasks, in order, matching the rows of
        ``grads`` and the keys of ``losses`` (a weighting with per-task state can tell
        which tasks these are). G is all-reduced already, so every rank leaves out the same.
        """
        # max |g| per row: a reduction, no K x P temporary; a NaN row stays in (NaN != 0)
        keep = (torch.linalg.vector_norm(G, ord=float("inf"), dim=1) != 0).tolist()
        self._subset_weights = None
        if all(keep):
            combined = self.weighting.combine_grads(G, losses)
        else:
            full = self.weighting.task_names
            present = [t for t, k in zip(full, keep) if k]
            # what the log reports for this step (the weighting's own weights() would pair
            # the full task list with the present tasks' coefficients)
            self._subset_weights = dict.fromkeys(full, 0.0)
            if not present:
                return None
            self.weighting.task_names = present
            try:
                combined = self.weighting.combine_grads(G[torch.tensor(keep, device=G.device)],
                                                        {t: losses[t] for t in present})
                reported = self.weighting.weights()
            finally:
                self.weighting.task_names = full
            # {} is a method's way of saying it reports no weights
            self._subset_weights = {**self._subset_weights, **reported} if reported else {}
        if combined.shape != (G.shape[1],):
            raise TrainingError(f"weighting: combine_grads returned shape {tuple(combined.shape)}, "
                                f"expected ({G.shape[1]},)")
        return combined

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
            seed_everything(derive_seed(self.cfg.seed, self.ctx.rank, 3))
        self._started = True
        self._phase = "idle"
        self._open_log()
        self._committed_rng = capture_rng()
        self._stop_requested = False
        restore = self._install_signal_handlers()
        t0 = time.perf_counter()
        elapsed0 = self.elapsed
        last_means: dict[str, float] = {}
        try:
            while self.epoch < self.cfg.epochs:
                last_means = self._run_epoch(t0, elapsed0)
        except KeyboardInterrupt:
            self.elapsed = elapsed0 + time.perf_counter() - t0
            self.reporter.close()
            if self._phase == "update":
                self.reporter.message("interrupted during a parameter update: no checkpoint saved "
                                      "(the previous one is kept)")
                raise
            if self._phase == "forward":
                with torch.no_grad():
                    for b, saved in zip(self._buffers(), self._buffer_snapshot):
                        b.copy_(saved)
            self._phase = "idle"
            self._save(["last"], rng=self._committed_rng)
            if self.run_dir is not None:
                self.reporter.message(f"interrupted: saved checkpoint at epoch {self.epoch + 1} step "
                                      f"{self.step_in_epoch} (global step {self.global_step})")
            raise
        finally:
            restore()
            self.reporter.close()
            self._close_log()
        if self.history:
            return self.history[-1]["metrics"]
        return {t: {"train_loss": v} for t, v in last_means.items()}

    def _run_epoch(self, t0: float, elapsed0: float) -> dict[str, float]:
        epoch = self.epoch
        if self.step_in_epoch == 0:
            self.weighting.on_epoch_start(epoch)
        self._apply_lr(epoch)
        self._set_data_epoch(epoch)
        plan = self.epoch_plan(epoch)
        start = min(self.step_in_epoch, len(plan))
        loader = self._loader(self._train_dataset(), [b for _, b in plan[start:]], derive_seed(self.cfg.seed, epoch, 4))
        self.raw_model.train()
        self.weighting.train()
        self.reporter.start_epoch(epoch, len(plan), start)
        for i, batch in enumerate(loader, start):
            domain = plan[i][0]
            # A KeyboardInterrupt inside the forward pass leaves BatchNorm statistics
            # half-updated; keep the buffers so the saved state is exactly the last step's.
            self._buffer_snapshot = [b.detach().clone() for b in self._buffers()]
            self._phase = "forward"
            values = self._train_step(batch, domain)
            self._phase = "idle"
            # commit the step: from here a checkpoint includes it
            self.step_in_epoch = i + 1
            self.global_step += 1
            for t, v in values.items():
                self.loss_sums[t] = self.loss_sums.get(t, 0.0) + v
                self.loss_counts[t] = self.loss_counts.get(t, 0) + 1
            self._committed_rng = capture_rng()
            lr = self.optimizer.param_groups[0]["lr"]
            self._log({"type": "step", "epoch": epoch + 1, "step": i + 1, "global_step": self.global_step,
                       "domain": domain, "losses": values, "weights": self._weights(), "lr": lr,
                       "time": time.time(), "elapsed": elapsed0 + time.perf_counter() - t0},
                      flush=(i + 1) % self.cfg.log_interval == 0)
            self.reporter.step(epoch, i + 1, values, lr)
            if D.any_flag(self._stop_requested, self.ctx):
                raise KeyboardInterrupt
        means = self._epoch_means()
        self.weighting.on_epoch_end(epoch, means)
        self.reporter.end_epoch(epoch, means)
        self._log({"type": "epoch", "epoch": epoch + 1, "global_step": self.global_step, "losses": means,
                   "weights": self._weights(), "time": time.time()}, flush=True)
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sums, self.loss_counts = {}, {}
        self.elapsed = elapsed0 + time.perf_counter() - t0
        stems = ["last"]
        if self.val_data is not None and (self.epoch % self.cfg.eval_interval == 0 or self.epoch == self.cfg.epochs):
            metrics = self.evaluate()
            record = {"epoch": self.epoch, "global_step": self.global_step, "metrics": metrics}
            shown = dict(metrics)
            if self.baselines:
                record["delta_m"] = self.delta_m(metrics)
                shown["Delta_m"] = {"% vs single-task": record["delta_m"]}
            self.history.append(record)
            self._log({"type": "eval", **record, "time": time.time()}, flush=True)
            self.reporter.metrics(epoch, shown)
            if self._update_best(metrics):
                stems.append("best")
        self._committed_rng = capture_rng()
        self._save(stems, rng=self._committed_rng)
        self._write_results()
        return means

    def delta_m(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """Delta_m% of ``metrics`` against ``self.baselines`` (their metrics, all tasks)."""
        from ..delta_m import delta_m

        directions = {t: dict(self.tasks[t].metrics().higher_is_better) for t in self.baselines}
        return float(delta_m(metrics, self.baselines, directions))

    def _buffers(self) -> list[Tensor]:
        return list(self.raw_model.buffers()) + list(self.weighting.buffers())

    def _weights(self) -> dict[str, float]:
        # a gradient-level step that left tasks out reports them at 0 (see _combine_present)
        w = getattr(self, "_subset_weights", None)
        return {k: float(v) for k, v in (w if w is not None else self.weighting.weights()).items()}

    def _epoch_means(self) -> dict[str, float]:
        names = [t for t in self.tasks if t in self.loss_counts] if not self.ctx.enabled else list(self.tasks)
        if self.ctx.enabled:  # every rank must hand the weighting the same means
            buf = torch.tensor([[self.loss_sums.get(t, 0.0), float(self.loss_counts.get(t, 0))] for t in names],
                               dtype=torch.float64)
            buf = D.all_reduce_sum(buf, self.ctx)
            return {t: float(buf[k, 0] / buf[k, 1]) for k, t in enumerate(names) if buf[k, 1] > 0}
        return {t: self.loss_sums[t] / self.loss_counts[t] for t in names}

    def _update_best(self, metrics: dict[str, dict[str, float]]) -> bool:
        if self.cfg.best_metric is None:
            return False
        task, name = self.cfg.best_metric.split("/")
        if name not in metrics.get(task, {}):
            raise ConfigError(f"training.best_metric: evaluation of task '{task}' gave no metric '{name}'")
        value = metrics[task][name]
        if not math.isfinite(value):
            return False
        if self.best is not None:
            better = value > self.best["value"] if self.best_higher else value < self.best["value"]
            if not better:
                return False
        self.best = {"metric": self.cfg.best_metric, "value": value, "epoch": self.epoch,
                     "global_step": self.global_step}
        return True

    # -- signals ---------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        """First Ctrl-C (or SIGTERM): finish the step, save, stop. Second Ctrl-C: stop now."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True

        for s in previous:
            signal.signal(s, handler)

        def restore():
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        return restore

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, split_data=None) -> dict[str, dict[str, float]]:
        """Metrics over a whole split ({task: {metric: value}}); default: the validation data.

        Under torchrun each rank evaluates indices rank, rank + world, ... (no padding, no
        sample twice) and the metric states are summed across ranks before ``compute``.
        """
        data = self.val_data if split_data is None else split_data
        if data is None:
            raise ConfigError("evaluate: no validation data given")
        model = self.raw_model
        was_training = model.training
        D.broadcast_buffers(model, self.ctx)
        model.eval()
        if isinstance(data, Mapping):
            for d in data:
                if d not in self.tasks:
                    raise ConfigError(f"evaluation data: domain '{d}' is not a task")
            items = [(d, ds, [d]) for d, ds in data.items()]
        else:
            items = [(None, data, list(self.tasks))]
        results: dict[str, dict[str, float]] = {}
        try:
            with torch.no_grad():
                for domain, ds, names in items:
                    shard = list(range(self.ctx.rank, len(ds), self.ctx.world_size))
                    loader = DataLoader(Subset(ds, shard), batch_size=self._batch_size(domain), shuffle=False,
                                        num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                        worker_init_fn=_seed_worker,
                                        # a generator keeps the global RNG (dropout stream) untouched
                                        generator=torch.Generator().manual_seed(self.cfg.seed))
                    states = {t: self.tasks[t].metrics() for t in names}
                    for batch in loader:
                        out = self._forward(model, batch, domain, "evaluation data")
                        targets = self._targets(batch, names, "evaluation data")
                        for t in names:
                            states[t].update(out[t], targets[t])
                    for t in names:
                        st = states[t]
                        for key in sorted(st.state):
                            st.state[key] = D.all_reduce_sum(st.state[key], self.ctx)
                        results[t] = {k: float(v) for k, v in st.compute().items()}
        finally:
            model.train(was_training)
        return results

    # -- files -------------------------------------------------------------------------------------
    def _open_log(self) -> None:
        if self.writes and self._log_fh is None:
            self._log_fh = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _log(self, record: dict[str, Any], flush: bool = False) -> None:
        if self._log_fh is not None:
            self._log_fh.write(json.dumps(record) + "\n")
            if flush:
                self._log_fh.flush()

    def _write_results(self) -> None:
        if not self.writes:
            return
        out: dict[str, Any] = {"epochs_done": self.epoch, "global_step": self.global_step,
                               "final": self.history[-1]["metrics"] if self.history else None,
                               "best": self.best, "history": self.history}
        n = self.cfg.metrics_last_n
        if n and self.history:
            last = self.history[-n:]
            mean: dict[str, dict[str, float]] = {}
            for t, values in last[-1]["metrics"].items():
                mean[t] = {k: float(np.mean([h["metrics"][t][k] for h in last])) for k in values}
            out["last_n_mean"] = {"n": len(last), "metrics": mean}
        atomic_write_json(self.run_dir / "results.json", out)

    def _save(self, stems: list[str], rng: dict[str, Any]) -> None:
        """Write checkpoints (rank 0); every rank takes part (buffers, RNG states)."""
        if self.run_dir is None:
            return
        D.broadcast_buffers(self.raw_model, self.ctx)
        for name, p in self.raw_model.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingError(f"weights became non-finite ('{name}') by global step {self.global_step}; "
                                    f"the last good checkpoint is kept")
        rng_json = rng_to_json(rng)
        if self.ctx.enabled:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rng_json)  # in-process exchange, never a file
            rngs = gathered
        else:
            rngs = [rng_json]
        if not self.writes:
            return
        tensors, opt_meta = pack_state(self.raw_model, self.optimizer, self.weighting)
        meta = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "world_size": self.ctx.world_size, "seed": self.cfg.seed,
            "loss_sums": self.loss_sums, "loss_counts": self.loss_counts,
            "rng": rngs, "weighting_state": self.weighting.get_state(),
            "schedule": {"name": self.sched_cfg.name, "base_lrs": self.base_lrs, "epoch": self.epoch,
                         "lr": [g["lr"] for g in self.optimizer.param_groups]},
            "optimizer": opt_meta, "recipe_sha256": self.recipe_hash,
            "best": self.best, "history": self.history, "elapsed": self.elapsed,
            "torch_version": torch.__version__,
        }
        save_checkpoint(self.run_dir / "checkpoints", tensors, meta, names=stems)  # one commit for all

    def _resume(self, path: str | os.PathLike) -> None:
        from .checkpoint import check_recipe

        meta, tensors, json_path = load_checkpoint(path)
        where = str(json_path)
        check_recipe(meta, self.recipe_hash, where)
        unpack_state(tensors, meta.get("optimizer", {}), self.raw_model, self.optimizer, self.weighting, where)
        self.base_lrs = list(meta.get("schedule", {}).get("base_lrs", self.base_lrs))
        try:
            self.weighting.set_state(meta.get("weighting_state") or {})
            self.epoch = int(meta["epoch"])
            self.step_in_epoch = int(meta["step_in_epoch"])
            self.global_step = int(meta["global_step"])
            self.loss_sums = {k: float(v) for k, v in meta.get("loss_sums", {}).items()}
            self.loss_counts = {k: int(v) for k, v in meta.get("loss_counts", {}).items()}
            self.history = list(meta.get("history", []))
            self.best = meta.get("best")
            self.elapsed = float(meta.get("elapsed", 0.0))
            rngs = meta["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: missing or bad field ({exc})") from None
        if meta.get("world_size", 1) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:
            self.reporter.message(f"note: the run used {meta.get('world_size')} processes, now "
                                  f"{self.ctx.world_size}: data order from here differs from an uninterrupted run")
            seed_everything(derive_seed(self.cfg.seed, self.ctx.rank, self.global_step, 3))
        if self.writes:  # every check passed: clear what a killed save left behind
            from .checkpoint import clean_checkpoints, remove_temp_files

            clean_checkpoints(self.run_dir / "checkpoints", keep=[json_path.parent])
            remove_temp_files(self.run_dir)
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log records past the checkpoint (written before a crash, about to be redone)."""
        if not self.writes:
            return
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if rec.get("global_step", 0) > self.global_step:
                continue
            if rec.get("type") in ("epoch", "eval") and rec.get("epoch", 0) > self.epoch:
                continue
            keep.append(line)
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
