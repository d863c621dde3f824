"""Extra batches a weighting draws during a step (:meth:`mtlkit.step_context.StepContext.draw_batch`):
Auto-Lambda's validation batch, a second training batch.

Each draw is a pure function of (run seed, epoch, global step, split, draw number, rank):
indices without replacement and per-sample seeds come from the ``EXTRA_BATCH`` seed
stream, so a resumed run draws the same batches, and the global RNGs (dropout) are left
as they were (samples load through :class:`.sampling.SeededSamples`). Under torchrun each
rank draws its own batch. Loaded in the main process (no DataLoader workers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset, default_collate

from ..errors import TrainingError
from .config import TrainingConfig
from .sampling import Seeds, SeededSamples, Stream, batch_size

SPLITS = ("train", "val")


class ExtraBatches:
    def __init__(self, train_data: Any, val_data: Any, cfg: TrainingConfig, rank: int) -> None:
        self.data = {"train": train_data, "val": val_data}
        self.cfg, self.rank = cfg, rank
        self.seeds = Seeds(cfg.seed)

    def draw(self, split: str, domains: list[str] | None, mixed: bool, epoch: int, step: int, draw: int) -> Any:
        """A batch of ``split`` shaped like the step's: one-to-many a batch; many-to-many the
        step's domain's batch, or ``{domain: batch}`` for a mixed step."""
        if split not in SPLITS:
            raise TrainingError(f"weighting: draw_batch split must be one of {', '.join(SPLITS)}, got {split!r}")
        data = self.data[split]
        if data is None:
            raise TrainingError(f"weighting: draw_batch({split!r}) needs {split} data, the trainer has none")
        gen = self.seeds.generator(Stream.EXTRA_BATCH, epoch, step, SPLITS.index(split) + 2 * draw, self.rank)
        if not isinstance(data, Mapping):
            return self._batch(data, self.cfg.batch_size, gen)
        batches = {d: self._batch(data[d], batch_size(self.cfg, d), gen) for d in domains or []}
        return batches if mixed else batches[domains[0]]

    @staticmethod
    def _batch(ds: Dataset, n: int, gen: np.random.Generator) -> dict:
        index = gen.choice(len(ds), size=min(n, len(ds)), replace=False).tolist()
        seeds = gen.integers(0, 2**62, size=len(index)).tolist()
        samples = SeededSamples(ds)
        return default_collate([samples[(i, s)] for i, s in zip(index, seeds)])
