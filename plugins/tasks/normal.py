"""Surface normals: 1 - mean cosine over valid pixels; angular error statistics.

A pixel is valid where the target normal is not the zero vector (the data's own marker of
a missing normal). Heads L2-normalise their output. Loss: ``1 - sum_valid (p . g) / #valid``.

``protocol="reference"`` also takes the reference's validity rule, in the loss and the
metrics: a pixel counts where the *signed sum* of the target's three components is not 0
(``sum(g, dim=1) != 0``). That drops the zero vector too, but also genuine normals whose
components cancel, such as (0.6, -0.6, 0) or (0.5, 0.25, -0.75) - rare in real data, but
the reference's numbers were computed that way.

Metrics: per-pixel angle = degrees(acos(clamp(p . g, -1, 1))), computed in float64, then
``mean`` and ``median`` (degrees, lower is better) and ``within_11.25`` / ``within_22.5`` /
``within_30`` (percent of pixels with angle strictly below the threshold, higher is better).

``protocol="exact"`` (default): whole-split pixel statistics. The state is sum-reducible:
the angle sum, the pixel count, the three threshold counts and a histogram of the angles
with bins of ``BIN_DEG`` = 0.005 degrees over [0, 180] (36,000 bins). The median is read
from the histogram: each of the (one or two) middle order statistics is replaced by the
centre of the bin that holds it, so the reported median is within ``BIN_DEG / 2`` =
0.0025 degrees of the exact median (numpy's definition: mean of the two middle values for
an even count). Mean and threshold percentages are exact.

``protocol="reference"``: the reference implementation's per-batch averaging: mean,
median and threshold fractions of each batch, then their mean over batches (its "median"
is a mean of batch medians). Batches without a valid pixel are skipped.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mtlkit.contracts import MetricState, Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

Protocol = Literal["exact", "reference"]
BIN_DEG = 0.005
NUM_BINS = int(round(180.0 / BIN_DEG))
THRESHOLDS = (11.25, 22.5, 30.0)
THRESHOLD_NAMES = tuple(f"within_{t:g}" for t in THRESHOLDS)  # within_11.25, within_22.5, within_30


class NormalParams(Params):
    target: str = "normal"
    protocol: Protocol = "exact"


def _check(prediction: Tensor, target: Tensor) -> None:
    if prediction.dim() != 4 or prediction.shape[1] != 3 or prediction.shape != target.shape:
        raise ValueError(
            f"normal: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be B x 3 x H x W"
        )


def valid_mask(target: Tensor, protocol: Protocol = "exact") -> Tensor:
    """B x H x W: the target normal is not the zero vector ("exact"), or its components do
    not sum to 0 ("reference", the reference implementation's rule)."""
    if protocol == "reference":
        return target.sum(dim=1) != 0
    return (target != 0).any(dim=1)


def angles_deg(prediction: Tensor, target: Tensor) -> Tensor:
    """B x H x W angles (degrees, float64) at every pixel, valid or not."""
    # float64: acos is steep near 1, float32 dot products would cost ~0.03 degree there
    dot = (prediction.double() * target.double()).sum(1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(dot))


def _median_like_numpy(ang: Tensor, valid: Tensor, n: Tensor) -> Tensor:
    """numpy's median of the ``n`` valid angles (0 when there is none), without a read: the
    invalid ones sort last as +inf and the middle ranks are gathered on the device."""
    s = torch.where(valid, ang, math.inf).flatten().sort().values
    ranks = torch.stack([torch.div(n - 1, 2, rounding_mode="floor"), torch.div(n, 2, rounding_mode="floor")])
    middle = s.gather(0, ranks.clamp_min(0)).mean()
    return torch.where(n > 0, middle, 0.0)


class NormalErrorState(MetricState):
    higher_is_better = {"mean": False, "median": False, **{name: True for name in THRESHOLD_NAMES}}

    def __init__(self, protocol: Protocol = "exact") -> None:
        super().__init__()
        self.protocol = protocol
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        if protocol == "exact":
            self.state = {"hist": z(NUM_BINS), "angle_sum": z(), "count": z(), "within": z(len(THRESHOLDS))}
        else:
            self.state = {"mean_sum": z(), "median_sum": z(), "within_sum": z(len(THRESHOLDS)), "batches": z()}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction = prediction.detach()
        target = target.to(prediction.device)
        _check(prediction, target)
        s = self.state_on(prediction.device)
        # every pixel's angle; invalid ones are masked out of each sum (no boolean indexing,
        # no read: either would wait for the device)
        ang, valid = angles_deg(prediction, target), valid_mask(target, self.protocol)
        n = valid.sum()
        nf = n.double()
        within = torch.stack([((ang < t) & valid).sum() for t in THRESHOLDS]).double()
        angle_sum = torch.where(valid, ang, 0.0).sum()
        if self.protocol == "exact":
            idx = torch.floor(ang / BIN_DEG).long().clamp_(0, NUM_BINS - 1).flatten()
            # scatter_add_, not bincount (bincount reads its input's largest value back)
            s["hist"].scatter_add_(0, idx, valid.flatten().double())
            s["angle_sum"] += angle_sum
            s["count"] += nf
            s["within"] += within
        else:  # a batch without a valid pixel adds 0 / 1 times 0: it is skipped
            s["mean_sum"] += self.batch_mean(angle_sum, nf)
            s["median_sum"] += _median_like_numpy(ang, valid, n)
            s["within_sum"] += self.batch_mean(within, nf)
            s["batches"] += (n > 0).double()

    @staticmethod
    def histogram_median(hist: Tensor) -> float:
        """Median from the bin histogram, within BIN_DEG / 2 of the exact one."""
        n = int(round(float(hist.sum())))
        if n == 0:
            return float("nan")
        cum = hist.cumsum(0)
        ranks = torch.tensor([(n - 1) // 2, n // 2], dtype=torch.float64, device=hist.device)
        # the bin holding the k-th smallest (0-based) is the first whose cumulative count > k
        bins = torch.searchsorted(cum, ranks, right=True)
        return float(((bins.double() + 0.5) * BIN_DEG).mean())

    def compute(self) -> dict[str, float]:
        s = self.state
        if self.protocol == "exact":
            n = float(s["count"])
            if n == 0:
                return {k: math.nan for k in self.higher_is_better}
            out = {"mean": float(s["angle_sum"]) / n, "median": self.histogram_median(s["hist"])}
            within = s["within"] / n
        else:
            n = float(s["batches"])
            if n == 0:
                return {k: math.nan for k in self.higher_is_better}
            out = {"mean": float(s["mean_sum"]) / n, "median": float(s["median_sum"]) / n}
            within = s["within_sum"] / n
        for name, frac in zip(THRESHOLD_NAMES, within.tolist()):
            out[name] = 100.0 * frac
        return out


class Normal(Task):
    """Per-pixel unit surface normals (heads L2-normalise)."""

    out_channels = 3
    output_activation = "l2_normalize"

    def __init__(self, params: NormalParams, name: str = "normal") -> None:
        self.name = name
        self.target = params.target
        self.protocol = params.protocol

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        target = target.to(prediction.device)
        _check(prediction, target)
        valid = valid_mask(target, self.protocol)
        n = valid.sum()
        dot = torch.where(valid, (prediction * target).sum(1), 0.0).sum()
        # no host read; a batch with no valid pixel gives 0 (not 1 - 0) and a zero gradient
        return (n > 0).to(dot.dtype) * (1.0 - dot / n.clamp_min(1))

    def metrics(self) -> NormalErrorState:
        return NormalErrorState(self.protocol)


@hookimpl
def register_tasks(register):
    register("normal", Normal, params=NormalParams,
             description="1 - cosine over valid normals; mean/median angle and % within 11.25/22.5/30 deg")
