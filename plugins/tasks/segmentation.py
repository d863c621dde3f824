"""Semantic segmentation: pixel NLL (ignore -1); mIoU and pixel accuracy over the whole split.

Metrics come from one confusion matrix accumulated over every pixel of the split whose
target lies in ``[0, num_classes)`` (so -1 "ignore" pixels, and any stray label >= C, are
not counted). Both are reported in percent:

- ``pixel_acc`` = trace / total;
- ``miou``: IoU_c = diag_c / (row_c + col_c - diag_c), averaged over the classes that
  *occur*, i.e. whose union (target or prediction pixels) is > 0. The reference gives NaN
  as soon as one class has no pixel at all in the split; skipping such classes keeps the
  number finite and is the usual convention. A class that occurs only in predictions has
  IoU 0 and does count.

``protocol="reference"`` keeps the same whole-split confusion matrix (the reference
accumulates one too) but averages IoU over *all* classes, so mIoU is NaN when a class has
no target or predicted pixel in the split, as in the reference. Never the default.

``protocol="per_image_2019"``: the MTAN paper's own numbers (CVPR 2019) come from the
2019 code, which scored each image on its own and averaged over images. Per image, for
each class j: union = pixels predicted j or labelled j, intersection = both; an "ignore"
pixel (-1) predicted as j therefore enlarges j's union. IoU is averaged over the classes
whose union in that image is > 0; pixel accuracy = correct / labelled pixels. The split's
values are the means over images (the 2019 code averaged per batch, then over batches:
the same for equal batches). Images without a labelled pixel are left out of the pixel
accuracy (the 2019 code gave NaN). The authors later moved to the whole-split confusion
matrix, which by their account raises mIoU by about 8%: use this only to compare with
the paper's tables.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mtlkit.contracts import MetricState, Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

IGNORE_INDEX = -1


class SegmentationParams(Params):
    num_classes: int = Field(..., ge=2)
    target: str = "segmentation"
    protocol: Literal["exact", "reference", "per_image_2019"] = "exact"


def _as_label_map(target: Tensor) -> Tensor:
    """Targets come as B x H x W (or B x 1 x H x W from some collate paths)."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def _check_shapes(prediction: Tensor, target: Tensor) -> None:
    if prediction.dim() != 4 or target.shape != (prediction.shape[0], *prediction.shape[2:]):
        raise ValueError(
            f"segmentation: prediction {tuple(prediction.shape)} (B x C x H x W) does not match "
            f"target {tuple(target.shape)} (B x H x W)"
        )


class ConfusionMatrixState(MetricState):
    """Whole-split confusion matrix (rows: target class, columns: predicted class)."""

    higher_is_better = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int, protocol: str = "exact") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.protocol = protocol
        # float64 counts are exact up to 2**53 pixels and all-reduce on every backend
        self.state = {"confusion": torch.zeros(num_classes, num_classes, dtype=torch.float64)}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        target = _as_label_map(target.to(prediction.device))
        _check_shapes(prediction, target)
        c = self.num_classes
        conf = self.state_on(prediction.device)["confusion"]
        pred = prediction.detach().argmax(1)
        keep = (target >= 0) & (target < c)
        # each kept pixel adds 1 at (target, prediction), the others 0 at (0, 0): no boolean
        # indexing and no bincount (both read values back, which waits for the device)
        flat = torch.where(keep, target * c + pred, 0).flatten()
        conf.view(-1).scatter_add_(0, flat, keep.flatten().to(torch.float64))

    def compute(self) -> dict[str, float]:
        conf = self.state["confusion"]
        total = float(conf.sum())
        if total == 0:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        diag = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - diag
        occurs = union > 0
        if self.protocol == "reference":
            iou = diag / union  # 0/0 = NaN for an absent class, as the reference gives
        else:
            iou = diag[occurs] / union[occurs]
        return {"miou": 100.0 * float(iou.mean()), "pixel_acc": 100.0 * float(diag.sum()) / total}


class PerImageState(MetricState):
    """The 2019 code's per-image mIoU and pixel accuracy, averaged over images (see the
    module docstring)."""

    higher_is_better = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        z = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        self.state = {"miou_sum": z(), "images": z(), "acc_sum": z(), "acc_images": z()}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        target = _as_label_map(target.to(prediction.device))
        _check_shapes(prediction, target)
        s = self.state_on(prediction.device)
        pred = prediction.detach().argmax(1)
        classes = torch.arange(self.num_classes, device=pred.device).view(1, -1, 1, 1)
        is_pred, is_true = pred.unsqueeze(1) == classes, target.unsqueeze(1) == classes  # B x C x H x W
        union = (is_pred | is_true).flatten(2).sum(2).double()
        inter = (is_pred & is_true).flatten(2).sum(2).double()
        present = union > 0  # every image has one: each pixel is predicted as some class
        iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(union))
        s["miou_sum"] += (iou.sum(1) / present.sum(1)).sum()
        s["images"] += float(pred.shape[0])
        labelled = (target >= 0).flatten(1).sum(1).double()
        correct = (pred == target).flatten(1).sum(1).double()  # never true at -1: pred >= 0
        has = labelled > 0  # an image without a labelled pixel adds 0 / 1 times 0 to both
        s["acc_sum"] += (has * correct / labelled.clamp_min(1)).sum()
        s["acc_images"] += has.sum()

    def compute(self) -> dict[str, float]:
        s = self.state
        n, m = float(s["images"]), float(s["acc_images"])
        return {"miou": 100.0 * float(s["miou_sum"]) / n if n else float("nan"),
                "pixel_acc": 100.0 * float(s["acc_sum"]) / m if m else float("nan")}


class Segmentation(Task):
    """Per-pixel classification; heads output log-probabilities."""

    output_activation = "log_softmax"

    def __init__(self, params: SegmentationParams, name: str = "segmentation") -> None:
        self.name = name
        self.target = params.target
        self.out_channels = params.num_classes
        self.num_classes = params.num_classes
        self.protocol = params.protocol

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        target = _as_label_map(target.to(prediction.device))
        _check_shapes(prediction, target)
        # the mean over labelled pixels without a host read; nothing labelled gives 0 / 1 = 0
        # (nll_loss's own mean would be 0/0 = NaN) and a zero gradient
        labelled = (target != IGNORE_INDEX).sum()
        return F.nll_loss(prediction, target, ignore_index=IGNORE_INDEX, reduction="sum") / labelled.clamp_min(1)

    def metrics(self) -> MetricState:
        if self.protocol == "per_image_2019":
            return PerImageState(self.num_classes)
        return ConfusionMatrixState(self.num_classes, self.protocol)


@hookimpl
def register_tasks(register):
    register("segmentation", Segmentation, params=SegmentationParams, tiny={"num_classes": 3},
             description="Pixel NLL (ignore -1); whole-split mIoU and pixel accuracy (%)")
