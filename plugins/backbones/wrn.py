"""Pre-activation Wide ResNet (WRN-28-4 by default): the MTAN Visual Decathlon backbone.

Structure (mtan-facts, "Visual Decathlon model"): conv1 3x3 (stride 1, 16 channels), then
three groups of ``(depth - 4) / 6`` pre-activation basic blocks of widths 16k, 32k, 64k
(k = widen_factor), each group starting with stride 2, then a final BN-ReLU. A block is
BN-ReLU-Conv3x3 (stride 1), BN-ReLU-Conv3x3 (the block's stride), plus a 1x1 conv shortcut
when the shape changes. At 72x72 input the maps are 72 -> 36 -> 18 -> 9.

Convolutions carry a bias, as in the published implementation: with them and the final
BatchNorm, WRN-28-4 has exactly 5,850,528 parameters (the facts' "shared body").

Feature contract: four encoder taps whose gate is also the feature: level 0 the conv1
output (pool_after), levels 1 and 2 the group outputs (pool_after), level 3 the last group
after the final BN-ReLU (what the classifier reads).

``domain_bn = true`` gives every BatchNorm one copy per domain (the factory's
``task_names``), switched with :func:`mtlkit.contracts.activate_task`.

``final_bn_momentum`` is the momentum of the final BatchNorm (PyTorch's convention: running
stat = (1 - m) * running + m * batch). The default 0.1 is every other BN's; the authors'
implementation builds this one BN with 0.9 (mtan-facts, "Two quirks"), so its running
statistics follow the last training batch almost entirely. That is a quirk, not a design
choice, so it is an option: 0.9 (with the classifier head's ``pool = "reference"``)
reproduces the authors' model exactly (tests/test_wrn_reference.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from pydantic import Field, field_validator
from torch import Tensor, nn

from mtlkit.contracts import StagedBackbone, Tap
from mtlkit.domains import domain_specific_or_shared
from mtlkit.hookspecs import hookimpl
from mtlkit.init import xavier_init
from mtlkit.registry import Params


class WRNParams(Params):
    depth: int = Field(28, ge=10, description="total depth; (depth - 4) must divide by 6")
    widen_factor: int = Field(4, ge=1)
    in_channels: int = Field(3, ge=1)
    domain_bn: bool = Field(False, description="one BatchNorm per domain (many-to-many)")
    final_bn_momentum: float = Field(
        0.1, description="momentum of the final BatchNorm, in (0, 1]; the authors' model uses 0.9")

    @field_validator("depth")
    @classmethod
    def _depth_form(cls, v: int) -> int:
        if (v - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (10, 16, 22, 28, ...), got {v}")
        return v

    @field_validator("final_bn_momentum")
    @classmethod
    def _momentum_range(cls, v: float) -> float:
        # 0 would freeze the running statistics at their initial values; NaN/inf would poison them.
        if not math.isfinite(v) or not 0.0 < v <= 1.0:
            raise ValueError(f"final_bn_momentum must be a finite number in (0, 1] "
                             f"(running = (1 - m) * running + m * batch), got {v}")
        return v


BNFactory = Callable[[int], nn.Module]


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3, BN-ReLU-Conv3x3(stride), plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int, bn: BNFactory) -> None:
        super().__init__()
        self.bn1 = bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.bn2 = bn(cout)
        # The stride sits on the second conv, as in the reference implementation.
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=True) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(StagedBackbone):
    """Pre-activation Wide ResNet; 4 stages (conv1, group1, group2, group3 + BN-ReLU)."""

    def __init__(self, params: WRNParams, task_names: list[str] | None = None) -> None:
        super().__init__()
        n = (params.depth - 4) // 6
        k = params.widen_factor
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.widths = widths
        self.task_names = list(task_names) if task_names else None

        def bn(c: int, momentum: float = 0.1) -> nn.Module:
            return domain_specific_or_shared(lambda: nn.BatchNorm2d(c, momentum=momentum), task_names,
                                             params.domain_bn)

        self.conv1 = nn.Conv2d(params.in_channels, widths[0], 3, stride=1, padding=1, bias=True)
        groups = []
        cin = widths[0]
        for cout in widths[1:]:
            blocks = [PreActBlock(cin, cout, 2, bn)] + [PreActBlock(cout, cout, 1, bn) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = groups
        self.bn_final = bn(widths[3], params.final_bn_momentum)
        self.relu = nn.ReLU(inplace=False)

        self.feature_info = [
            Tap("conv1", widths[0], widths[0], 1, "encoder", pool_after=True),
            Tap("group1", widths[1], widths[1], 2, "encoder", pool_after=True),
            Tap("group2", widths[2], widths[2], 4, "encoder", pool_after=True),
            Tap("group3", widths[3], widths[3], 8, "encoder", pool_after=False),
        ]
        self.out_channels = widths[3]
        self.out_stride = 8
        self.num_stages = 4
        self.stage_out_channels = list(widths)
        self.stage_roles = ["encoder"] * 4
        xavier_init(self)  # the reference initialisation (mtlkit.init)

    def run_stage(self, index: int, x: Tensor, state: dict[str, Any]) -> Tensor:
        if index == 0:
            return self.conv1(x)
        if index == 1:
            return self.layer1(x)
        if index == 2:
            return self.layer2(x)
        if index == 3:
            return self.relu(self.bn_final(self.layer3(x)))
        raise IndexError(f"wrn has 4 stages, got stage {index}")


def build_wrn(params: WRNParams, task_names: list[str] | None = None) -> WideResNet:
    """Pre-activation Wide ResNet (WRN-28-4 default; MTAN Visual Decathlon backbone)."""
    return WideResNet(params, task_names=task_names)


@hookimpl
def register_backbones(register):
    register("wrn", build_wrn, params=WRNParams, tiny={"depth": 10, "widen_factor": 1},
             description="Pre-activation Wide ResNet (WRN-28-4, 72x72; optional domain BN)")
