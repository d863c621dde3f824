"""Classification head: average pooling, then one linear layer (raw scores: the build path
applies the task's log-softmax).

``pool = "global"`` (the default) averages the whole final map. ``pool = "reference"`` is
the authors' Visual Decathlon pooling, ``avg_pool2d(x, 8)``: on the WRN's 9x9 map (72x72
input) it averages only the top-left 8x8 window and drops the last row and column
(mtan-facts, "Two quirks"). It exists to reproduce the authors' model exactly (with the WRN's
``final_bn_momentum = 0.9``; tests/test_wrn_reference.py); it is not the default because it
ignores part of the image for no reason and depends on the input size, where the global mean
is the pooling the paper describes and works at any size.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mtlkit.contracts import Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

REFERENCE_POOL_KERNEL = 8  # the authors' avg_pool2d(x, 8)


class ClassifierParams(Params):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pool: Literal["global", "reference"] = Field(
        "global", description="'global': mean of the whole map; 'reference': the authors' "
                              "avg_pool2d(x, 8) (top-left 8x8 of the Decathlon WRN's 9x9 map)")


def reference_pool(x: Tensor) -> Tensor:
    """``avg_pool2d(x, 8)`` flattened, as the authors' model; only defined where it yields one
    value per channel (final maps of 8 to 15 pixels a side), where the authors' linear layer
    would otherwise fail on a shape mismatch (or, below 8, on an empty pool)."""
    h, w = x.shape[-2:]
    if not (REFERENCE_POOL_KERNEL <= h < 2 * REFERENCE_POOL_KERNEL
            and REFERENCE_POOL_KERNEL <= w < 2 * REFERENCE_POOL_KERNEL):
        raise ValueError(
            f"classifier pool='reference' is avg_pool2d(x, {REFERENCE_POOL_KERNEL}) and needs a final map of "
            f"{REFERENCE_POOL_KERNEL}..{2 * REFERENCE_POOL_KERNEL - 1} pixels a side (9x9 for the Decathlon WRN "
            f"at 72x72); got {h}x{w}: use pool='global'")
    return F.avg_pool2d(x, REFERENCE_POOL_KERNEL).flatten(1)


class ClassifierHead(nn.Module):
    def __init__(self, params: ClassifierParams, in_channels: int, task: Task) -> None:
        super().__init__()
        self.pool_mode = params.pool
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(params.dropout) if params.dropout else nn.Identity()
        self.fc = nn.Linear(in_channels, task.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = reference_pool(x) if self.pool_mode == "reference" else self.pool(x).flatten(1)
        return self.fc(self.dropout(x))


@hookimpl
def register_heads(register):
    register("classifier", ClassifierHead, params=ClassifierParams,
             description="Average pool (global, or the authors' 8x8 window) + linear layer (classification)")
