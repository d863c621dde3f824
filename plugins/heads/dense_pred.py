"""Dense prediction head: Conv3x3 in -> mid, then Conv1x1 mid -> out, nothing between.

That is the reference's task head on SegNet (no BN or ReLU between the two convs); the
task's output activation (log-softmax, identity, L2 normalisation) is applied last. It keeps
the feature map's resolution: SegNet's decoder already returns full-resolution features.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from mtlkit.contracts import Task, apply_activation
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class DensePredParams(Params):
    mid_channels: int | None = Field(None, ge=1)  # None: the input's channel count


class DensePredHead(nn.Module):
    def __init__(self, params: DensePredParams, in_channels: int, task: Task) -> None:
        super().__init__()
        mid = params.mid_channels or in_channels
        self.activation = task.output_activation
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.pred = nn.Conv2d(mid, task.out_channels, 1)
        for m in (self.conv, self.pred):  # the reference's init, as for the backbone
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return apply_activation(self.activation, self.pred(self.conv(x)))


@hookimpl
def register_heads(register):
    register("dense_pred", DensePredHead, params=DensePredParams,
             description="Conv3x3 + Conv1x1 per-pixel head (segmentation, depth, normals)")
