"""The ``tensorboard`` logger: TensorBoard event files in the run folder.

Scalars (named by :func:`mtlkit.engine.loggers.scalars`, at the record's global step and
wall time): training losses, task weights, learning rate and step time per step, epoch
means, every evaluation metric and Delta_m; and at each evaluation the attention masks of
the first validation samples as images (models with attention masks). Needs the
``tensorboard`` package (``pip install 'mtlkit[tensorboard]'``). A resumed run opens a
new event file whose ``purge_step`` is the step after the checkpoint: TensorBoard then
drops what the interrupted process logged past it, and the curves continue with no step
twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from mtlkit.engine.loggers import Logger, Position, scalars
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params
from mtlkit.rundir import run_folder_entry_problem


class TensorBoardParams(Params):
    dir: str = Field("tensorboard", description="folder of the event files, in the run folder")
    images: int = Field(2, ge=0, le=16, description="validation samples whose attention masks are logged as "
                        "images at each evaluation (0: none)")

    @field_validator("dir")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        problem = run_folder_entry_problem(v, "folder name")
        if problem or Path(v).name != v:
            raise ValueError(problem or f"'{v}' must be a plain folder name (it is made in the run folder)")
        return v


def summary_writer_class():
    """torch's SummaryWriter; a one-line error naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logger 'tensorboard' needs the tensorboard package: "
                          "pip install 'mtlkit[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLogger(Logger):
    def __init__(self, params: TensorBoardParams) -> None:
        self._writer_class = summary_writer_class()  # refused at build time, before the run starts
        self.dir = params.dir
        self.wants_images = params.images
        self.writer = None

    def open(self, run_dir: Path, resume: Position | None) -> None:
        purge = resume.global_step + 1 if resume is not None else None
        self.writer = self._writer_class(log_dir=str(run_dir / self.dir), purge_step=purge)

    def log(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            for tag, value in scalars(r):
                self.writer.add_scalar(tag, value, global_step=r["global_step"], walltime=r.get("time"))
        self.writer.flush()

    def log_images(self, epoch: int, global_step: int, images: dict[str, np.ndarray]) -> None:
        for tag, image in images.items():
            self.writer.add_image(tag, np.clip(image, 0, 1), global_step=global_step,
                                  dataformats="HWC" if image.ndim == 3 else "HW")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger, params=TensorBoardParams,
             description="TensorBoard event files: losses, weights, lr, step time, metrics, Delta_m, "
                         "attention masks")
