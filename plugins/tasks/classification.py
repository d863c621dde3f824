"""Classification: cross-entropy loss; top-1 accuracy and mean loss over the whole split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mtlkit.contracts import MetricState, Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class ClassificationParams(Params):
    num_classes: int = Field(..., ge=2)
    target: str = "label"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class AccuracyState(MetricState):
    higher_is_better = {"accuracy": True, "loss": False}

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.state = {"correct": torch.zeros((), dtype=torch.float64),
                      "count": torch.zeros((), dtype=torch.float64),
                      "nll_sum": torch.zeros((), dtype=torch.float64)}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        logp = prediction.detach().float()
        target = target.to(logp.device).long()
        s = self.state_on(logp.device)  # the sums stay on the device: nothing is read back here
        s["correct"] += (logp.argmax(1) == target).sum().double()
        s["count"] += float(target.numel())
        s["nll_sum"] += F.nll_loss(logp, target, reduction="sum").double()

    def compute(self) -> dict[str, float]:
        n = float(self.state["count"])
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        return {"accuracy": 100.0 * float(self.state["correct"]) / n, "loss": float(self.state["nll_sum"]) / n}


class Classification(Task):
    """Image classification (heads output log-probabilities)."""

    output_activation = "log_softmax"
    default_head = "classifier"

    def __init__(self, params: ClassificationParams, name: str = "classification") -> None:
        self.name = name
        self.target = params.target
        self.out_channels = params.num_classes
        self.label_smoothing = params.label_smoothing

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        if self.label_smoothing:
            # prediction is log-softmax: smoothed NLL written out
            nll = F.nll_loss(prediction, target)
            return (1 - self.label_smoothing) * nll - self.label_smoothing * prediction.mean(1).mean()
        return F.nll_loss(prediction, target)

    def metrics(self) -> AccuracyState:
        return AccuracyState(self.out_channels)


@hookimpl
def register_tasks(register):
    register("classification", Classification, params=ClassificationParams, tiny={"num_classes": 3},
             description="Cross-entropy; top-1 accuracy (%) over the whole split")
