"""Helpers for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StandInTask:
    """A task's output description without its loss or metrics: enough to size heads and
    compose a model (``mtlkit.compose(tasks={"seg": StandInTask("seg", "segmentation", 13,
    "log_softmax")})``) where no task plugin is needed, e.g. for parameter counts."""

    name: str
    target: str
    out_channels: int
    output_activation: str = "identity"
    default_head: str = "dense_pred"
