"""ResNet-26 with residual adapters (Rebuffi et al. 2017/2018), for the Visual Decathlon.

Structure: a 3x3 stem conv (``stem_width``, 32 as in the adapter papers' code, stride 1),
then 3 stages of 4 basic blocks of widths 64, 128, 256, each stage starting with stride 2
(64 px -> 32 -> 16 -> 8), then a final BN-ReLU: 1 + 24 convolutions + the classifier
head = 26 layers. Blocks are post-activation (unit(x) -> ReLU -> unit -> + shortcut ->
ReLU); the shortcut is parameter-free (2x2 average pool, zero channels appended) where
the shape changes, so that every parameter of the network is accounted for by its convs
and its domain-specific layers.

Each "unit" is a shared 3x3 conv (no bias) followed by domain-specific layers:

- ``adapter = "none"``: a domain-specific BatchNorm;
- ``"series"``: domain BN, then a domain 1x1 conv (C_out -> C_out) added back through a
  skip connection, then a second domain BN (decathlon.md, series adapter);
- ``"parallel"``: a domain 1x1 conv (C_in -> C_out, the unit's stride) on the unit's input
  added to the 3x3 conv's output, then a domain BN (parallel adapter).

Every unit has an adapter, the stem included (as in the papers' code). The final BN is
domain-specific too. Domains come from the factory's ``task_names``; without them there
is one domain, ``"default"``.

``domain_bn = false`` (with ``adapter = "none"`` only) gives the plain ResNet-26 with one
BatchNorm per layer shared by every domain: Rebuffi et al.'s ImageNet network, the frozen
trunk of the Feature baseline (its statistics frozen with it), and, with one network per
domain, the Scratch and Finetune rows. With several domains, evaluation recomputes the
shared statistics per domain (:mod:`mtlkit.engine.bn_stats`).

Feature contract: four encoder taps (gate = feature): the stem output and the three stage
outputs (the last after the final BN-ReLU); pool_after for the first three.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from mtlkit.contracts import StagedBackbone, Tap
from mtlkit.domains import domain_specific_or_shared
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params

AdapterKind = Literal["series", "parallel", "none"]


class ResNet26Params(Params):
    adapter: AdapterKind = "parallel"
    in_channels: int = Field(3, ge=1)
    stem_width: int = Field(32, ge=1)
    widths: list[PositiveInt] = Field(default_factory=lambda: [64, 128, 256], min_length=1)
    blocks_per_stage: int = Field(4, ge=1)
    domain_bn: bool = Field(True, description="one BatchNorm per domain; false: one shared by every domain "
                            "(the plain ResNet-26; adapter = 'none' only)")

    @model_validator(mode="after")
    def _shared_bn_is_plain(self) -> "ResNet26Params":
        if not self.domain_bn and self.adapter != "none":
            raise ValueError(f"domain_bn = false needs adapter = 'none': a {self.adapter} adapter's BatchNorm "
                             f"belongs to its domain")
        return self


class _PlainDomain(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(y)


class _SeriesDomain(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(cout)
        self.adapter = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        y = self.bn_in(y)
        return self.bn_out(y + self.adapter(y))


class _ParallelDomain(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(y + self.adapter(x))


_DOMAIN_UNITS = {"none": _PlainDomain, "series": _SeriesDomain, "parallel": _ParallelDomain}


class AdaptedConv(nn.Module):
    """A shared 3x3 conv followed by its domain-specific layers (see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int, adapter: str, task_names: list[str],
                 domain_bn: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        unit = _DOMAIN_UNITS[adapter]
        self.domain = domain_specific_or_shared(lambda: unit(cin, cout, stride), task_names, domain_bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.domain(x, self.conv(x))


class AdapterBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, adapter: str, task_names: list[str],
                 domain_bn: bool = True) -> None:
        super().__init__()
        self.unit1 = AdaptedConv(cin, cout, stride, adapter, task_names, domain_bn)
        self.unit2 = AdaptedConv(cout, cout, 1, adapter, task_names, domain_bn)
        self.stride = stride
        self.extra_channels = cout - cin
        if self.extra_channels < 0:
            raise ValueError(f"resnet26: widths must not decrease ({cin} -> {cout})")

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: Tensor) -> Tensor:
        y = self.unit2(F.relu(self.unit1(x)))
        return F.relu(y + self.shortcut(x))


class ResNet26Adapters(StagedBackbone):
    """ResNet-26 (64 px) with series / parallel residual adapters and domain BatchNorm."""

    def __init__(self, params: ResNet26Params, task_names: list[str] | None = None) -> None:
        super().__init__()
        names = list(task_names) if task_names else ["default"]
        self.task_names = names
        self.adapter = params.adapter
        dbn = params.domain_bn
        self.stem = AdaptedConv(params.in_channels, params.stem_width, 1, params.adapter, names, dbn)
        stages = []
        cin = params.stem_width
        for cout in params.widths:
            blocks = [AdapterBlock(cin, cout, 2, params.adapter, names, dbn)]
            blocks += [AdapterBlock(cout, cout, 1, params.adapter, names, dbn)
                       for _ in range(params.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.bn_final = domain_specific_or_shared(lambda: nn.BatchNorm2d(cin), names, dbn)

        chans = [params.stem_width, *params.widths]
        n = len(chans)
        self.feature_info = [
            Tap("stem" if i == 0 else f"stage{i}", c, c, 2**i, "encoder", pool_after=i < n - 1)
            for i, c in enumerate(chans)
        ]
        self.out_channels = chans[-1]
        self.out_stride = 2 ** (n - 1)
        self.num_stages = n
        self.stage_out_channels = chans
        self.stage_roles = ["encoder"] * n
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Adapters start at zero: training starts from the shared convolutions alone.
        for m in self.modules():
            if isinstance(m, (_SeriesDomain, _ParallelDomain)):
                nn.init.zeros_(m.adapter.weight)

    def run_stage(self, index: int, x: Tensor, state: dict[str, Any]) -> Tensor:
        if index == 0:
            return F.relu(self.stem(x))
        if not 0 < index < self.num_stages:
            raise IndexError(f"resnet26 has {self.num_stages} stages, got stage {index}")
        x = self.stages[index - 1](x)
        if index == self.num_stages - 1:
            x = F.relu(self.bn_final(x))
        return x


def build_resnet26(params: ResNet26Params, task_names: list[str] | None = None) -> ResNet26Adapters:
    """ResNet-26 with residual adapters (series/parallel/none) and domain BatchNorm."""
    return ResNet26Adapters(params, task_names=task_names)


@hookimpl
def register_backbones(register):
    register("resnet26", build_resnet26, params=ResNet26Params, tiny={"stem_width": 4, "widths": [4, 8], "blocks_per_stage": 1},
             description="ResNet-26 (64 px) with series/parallel residual adapters, domain BN")


__all__ = ["ResNet26Adapters", "ResNet26Params", "AdaptedConv", "build_resnet26"]
