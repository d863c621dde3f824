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


# The smallest complete recipe: one classification task on the built-in synthetic shapes,
# a two-stage SmallCNN, one CPU epoch of two steps (seconds). Tests build their bad inputs
# from it.
TINY_CLASSIFICATION_RECIPE = """
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[tasks.shape]
name = "classification"
params = { num_classes = 4, target = "shape" }
[data]
name = "synthetic_classification"
params = { size = 8, num_train = 8, num_val = 4 }
[training]
epochs = 1
batch_size = 4
device = "cpu"
"""
