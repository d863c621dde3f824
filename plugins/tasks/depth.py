"""Depth regression: L1 over valid pixels; absolute and relative error.

A pixel is valid where the target is non-zero (0 marks missing depth). Loss:
``sum_valid |p - g| / #valid`` (0, with a gradient path, for a batch with no valid pixel).

Metrics, with ``protocol="exact"`` (the default): whole-split pixel statistics,
``abs_err = sum |p - g| / N`` and ``rel_err = sum |p - g| / g / N`` over all N valid pixels
of the split. The state is three float64 sums, so DDP all-reduces it exactly.

``protocol="reference"`` reproduces the reference implementation: each batch's mean over
its valid pixels, then the mean of those batch means (so results depend on the batch size
and on how the split is divided). Batches without a valid pixel are skipped (the reference
would turn the whole result into NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlkit.contracts import MetricState, Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

Protocol = Literal["exact", "reference"]


class DepthParams(Params):
    target: str = "depth"
    protocol: Protocol = "exact"


def _as_b1hw(x: Tensor) -> Tensor:
    return x.unsqueeze(1) if x.dim() == 3 else x


def _prepare(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    prediction = _as_b1hw(prediction)
    target = _as_b1hw(target.to(prediction.device))
    if prediction.shape != target.shape or prediction.shape[1] != 1:
        raise ValueError(
            f"depth: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be B x 1 x H x W"
        )
    return prediction, target


class DepthErrorState(MetricState):
    higher_is_better = {"abs_err": False, "rel_err": False}

    def __init__(self, protocol: Protocol = "exact") -> None:
        super().__init__()
        self.protocol = protocol
        zero = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        if protocol == "exact":
            self.state = {"abs_sum": zero(), "rel_sum": zero(), "count": zero()}
        else:
            self.state = {"abs_batch_sum": zero(), "rel_batch_sum": zero(), "batches": zero()}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction, target = _prepare(prediction.detach(), target)
        s = self.state_on(prediction.device)
        valid = target != 0
        # float64 so a whole split's sums do not lose digits; invalid pixels add 0 (masks,
        # not boolean indexing, which would wait for the device)
        g = target.double()
        err = torch.where(valid, (prediction.double() - g).abs(), 0.0)
        abs_sum = err.sum()
        rel_sum = (err / torch.where(valid, g, 1.0)).sum()
        n = valid.sum(dtype=torch.float64)
        if self.protocol == "exact":
            s["abs_sum"] += abs_sum
            s["rel_sum"] += rel_sum
            s["count"] += n
        else:  # a batch without a valid pixel adds 0 / 1 times 0: it is skipped
            s["abs_batch_sum"] += self.batch_mean(abs_sum, n)
            s["rel_batch_sum"] += self.batch_mean(rel_sum, n)
            s["batches"] += (n > 0).double()

    def compute(self) -> dict[str, float]:
        s = self.state
        if self.protocol == "exact":
            n = float(s["count"])
            a, r = s["abs_sum"], s["rel_sum"]
        else:
            n = float(s["batches"])
            a, r = s["abs_batch_sum"], s["rel_batch_sum"]
        if n == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan")}
        return {"abs_err": float(a) / n, "rel_err": float(r) / n}


class Depth(Task):
    """Per-pixel depth (raw head output, no activation)."""

    out_channels = 1
    output_activation = "identity"

    def __init__(self, params: DepthParams, name: str = "depth") -> None:
        self.name = name
        self.target = params.target
        self.protocol = params.protocol

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        prediction, target = _prepare(prediction, target)
        valid = target != 0
        # no host read (the engine keeps steps on the device): a batch with no valid pixel
        # gives 0 / 1 = 0 and a zero gradient
        return torch.where(valid, (prediction - target).abs(), 0.0).sum() / valid.sum().clamp_min(1)

    def metrics(self) -> DepthErrorState:
        return DepthErrorState(self.protocol)


@hookimpl
def register_tasks(register):
    register("depth", Depth, params=DepthParams,
             description="L1 over valid depth (0 = invalid); abs/rel error over the whole split")
