"""Dense prediction head: Conv3x3 in -> mid, then Conv1x1 mid -> out, nothing between.

That is the reference's task head on SegNet (no BN or ReLU between the two convs). It returns
raw scores: the build path applies the task's output activation (log-softmax, identity, L2
normalisation). On full-resolution features (SegNet's decoder) it keeps the resolution; on
features ``in_stride`` times smaller (a timm or ResNet encoder) it upsamples its prediction
bilinearly by ``in_stride`` (before the activation), so dense tasks get per-pixel outputs.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mtlkit.contracts import Task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class DensePredParams(Params):
    mid_channels: int | None = Field(None, ge=1)  # None: the input's channel count


class DensePredHead(nn.Module):
    def __init__(self, params: DensePredParams, in_channels: int, task: Task, in_stride: int = 1) -> None:
        super().__init__()
        mid = params.mid_channels or in_channels
        self.in_stride = int(in_stride)
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.pred = nn.Conv2d(mid, task.out_channels, 1)
        for m in (self.conv, self.pred):  # the reference's init, as for the backbone
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pred(self.conv(x))
        if self.in_stride > 1:
            y = F.interpolate(y, scale_factor=self.in_stride, mode="bilinear", align_corners=False)
        return y


@hookimpl
def register_heads(register):
    register("dense_pred", DensePredHead, params=DensePredParams,
             description="Conv3x3 + Conv1x1 per-pixel head (segmentation, depth, normals)")
