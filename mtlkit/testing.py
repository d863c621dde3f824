"""Helpers for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from .contracts import Task


@dataclass
class StandInTask(Task):
    """A task's output description without its loss or metrics: enough to size heads and
    compose a model where no task plugin is needed, e.g. for parameter counts::

        model = mtlkit.compose(backbone=("segnet", {"width": 0.0625}),
                               tasks={"seg": StandInTask("seg", "segmentation", 13, "log_softmax")})

    It is a :class:`~mtlkit.contracts.Task`, so ``compose`` takes it as one; training with it
    fails at the first loss (it has none)."""

    name: str
    target: str
    out_channels: int
    output_activation: str = "identity"
    default_head: str = "dense_pred"
