"""SegNet: the VGG-16 encoder-decoder that MTAN and its SegNet baselines share.

Structure (widths ``[64, 128, 256, 512, 512]`` at ``width=1``):

- a "conv layer" is Conv3x3 (padding 1, with bias) -> BN -> ReLU; with ``deep=True`` every
  conv layer becomes two (the second keeps the channel count: Split, Deep);
- encoder stages of 2, 2, 3, 3, 3 conv layers, each followed by a 2x2 max pool that keeps
  its indices;
- decoder stages (deepest first) that max-unpool with the matching encoder indices, then
  3, 3, 3, 2, 2 conv layers; the last one outputs ``widths[0]`` channels at full resolution;
- conv weights xavier-normal, biases 0; BN weight 1, bias 0.

It honours the feature contract (10 taps: 5 encoder, then 5 decoder, deepest first) and the
staged contract (10 stages: encoder stage ``i`` = convs + pool, decoder stage = unpool +
convs), so ``mtan``, ``cross_stitch`` and ``dense`` can all drive it.

Dense support: ``stage_input``/``stage_body`` split a stage at the point where Dense
concatenates the shared network's features; ``with_stage_extra()`` builds the same network
whose stages ``i > 0`` take twice their usual input channels.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlkit.contracts import StagedBackbone, Tap
from mtlkit.hookspecs import hookimpl
from mtlkit.init import xavier_init
from mtlkit.registry import Params

BASE_WIDTHS = (64, 128, 256, 512, 512)
ENCODER_CONVS = (2, 2, 3, 3, 3)
DECODER_CONVS = (3, 3, 3, 2, 2)  # deepest first


class SegNetParams(Params):
    width: float = Field(1.0, gt=0, description="multiplier of every stage's width")
    widths: list[PositiveInt] | None = Field(None, min_length=5, max_length=5)
    deep: bool = False
    in_channels: int = Field(3, ge=1)
    stage_input_extra: bool = False


segnet_init = xavier_init  # the reference initialisation (mtlkit.init)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resolve_widths(params: SegNetParams) -> list[int]:
    """Scaled widths: ``max(1, round(width * c))`` (the params model keeps both positive)."""
    base = list(params.widths) if params.widths is not None else list(BASE_WIDTHS)
    return [max(1, round(params.width * c)) for c in base]


def _layer(cin: int, cout: int, deep: bool) -> nn.Sequential:
    if deep:
        return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))
    return conv_bn_relu(cin, cout)


class SegNet(StagedBackbone):
    """VGG-16 SegNet encoder-decoder (see the module docstring)."""

    def __init__(self, params: SegNetParams) -> None:
        super().__init__()
        self.params = params
        w = resolve_widths(params)
        self.widths = w
        extra = 2 if params.stage_input_extra else 1

        enc_io = [(params.in_channels if s == 0 else w[s - 1], w[s]) for s in range(5)]
        # decoder stage d undoes encoder level 4 - d: in = w[L], out = w[L - 1] (w[0] at the top)
        dec_io = [(w[4 - d], w[3 - d] if d < 4 else w[0]) for d in range(5)]
        self.stage_in_channels = [cin for cin, _ in enc_io] + [cin for cin, _ in dec_io]

        stages = []
        for i, ((cin, cout), n) in enumerate(zip(enc_io + dec_io, ENCODER_CONVS + DECODER_CONVS)):
            first_in = cin * extra if i > 0 else cin
            if extra > 1 and i == len(ENCODER_CONVS) + len(DECODER_CONVS) - 1:
                # Dense's task networks keep the doubled width through their top stage and
                # reduce at its last conv (128 -> 128 -> 64 in the reference).
                layers = [_layer(first_in, first_in, params.deep) for _ in range(n - 1)]
                layers.append(_layer(first_in, cout, params.deep))
            else:
                layers = [_layer(first_in, cout, params.deep)] + [_layer(cout, cout, params.deep)
                                                                 for _ in range(n - 1)]
            stages.append(nn.ModuleList(layers))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

        self.num_stages = 10
        self.stage_roles = ["encoder"] * 5 + ["decoder"] * 5
        self.stage_out_channels = [cout for _, cout in enc_io] + [cout for _, cout in dec_io]
        self.feature_info = [
            Tap(f"encoder{s}", w[s], w[s], 2**s, "encoder", pool_after=True) for s in range(5)
        ] + [
            Tap(f"decoder{d}", dec_io[d][1], dec_io[d][0], 2 ** (4 - d), "decoder") for d in range(5)
        ]
        self.out_channels = w[0]
        self.out_stride = 1
        segnet_init(self)

    # -- Dense support ------------------------------------------------------------
    def with_stage_extra(self) -> "SegNet":
        """A fresh network with the same widths whose stages ``i > 0`` also read an equally
        wide extra tensor (Dense's task networks read the shared network's stage inputs)."""
        return SegNet(self.params.model_copy(update={"stage_input_extra": True}))

    def discard_stage_body(self, index: int) -> None:
        """Drop a stage's convs whose output nobody reads (Dense's shared last stage), so
        the model holds no dead parameters; ``stage_input`` still works for that stage."""
        self.stages[index] = nn.ModuleList()

    # -- staged execution ---------------------------------------------------------
    def stage_input(self, index: int, x: Tensor, state: dict[str, Any]) -> Tensor:
        """What the stage's first conv reads: ``x`` itself (encoder; it arrives pooled) or
        ``x`` max-unpooled with the matching encoder level's indices (decoder)."""
        if index < 5:
            return x
        level = 9 - index
        return self.unpool(x, state["indices"][level], output_size=state["sizes"][level])

    def stage_body(self, index: int, x: Tensor, state: dict[str, Any], taps: list | None = None) -> Tensor:
        gate_in = x
        layers = self.stages[index]
        if len(layers) == 0:
            raise RuntimeError(f"SegNet stage {index} was discarded")
        gate = layers[0](x)
        out = gate
        for layer in layers[1:]:
            out = layer(out)
        if index < 5:
            if taps is not None:
                taps.append((gate, out))
            state.setdefault("indices", {})
            state.setdefault("sizes", {})
            state["sizes"][index] = out.shape[-2:]
            out, state["indices"][index] = self.pool(out)
        elif taps is not None:
            taps.append((gate_in, out))
        return out

    def run_stage(self, index: int, x: Tensor, state: dict[str, Any], extra: Tensor | None = None) -> Tensor:
        inp = self.stage_input(index, x, state)
        if self.params.stage_input_extra and index > 0:
            if extra is None:
                raise RuntimeError("this SegNet (stage_input_extra=True) needs the extra stage input")
            inp = torch.cat((inp, extra), dim=1)
        return self.stage_body(index, inp, state)

    # -- feature contract ---------------------------------------------------------
    def forward_taps(self, x: Tensor):
        if self.params.stage_input_extra:
            raise RuntimeError("a SegNet with stage_input_extra=True runs only stage by stage (Dense)")
        state: dict[str, Any] = {}
        taps: list[tuple[Tensor, Tensor]] = []
        for i in range(self.num_stages):
            # decoder taps' gate is the unpooled input: stage_body sees it as its x
            x = self.stage_body(i, self.stage_input(i, x, state), state, taps)
        return x, taps

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x)[0]


def build_segnet(params: SegNetParams) -> SegNet:
    """VGG-16 SegNet encoder-decoder (width, deep, widths; MTAN's shared network)."""
    return SegNet(params)


@hookimpl
def register_backbones(register):
    register("segnet", build_segnet, params=SegNetParams, tiny={"width": 0.0625},
             description="VGG-16 SegNet encoder-decoder (MTAN one-to-many; width/deep/widths variants)")
