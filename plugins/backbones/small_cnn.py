"""A small plain CNN: quick starts and tests of the core."""

from __future__ import annotations

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlkit.contracts import Backbone, Tap
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class SmallCNNParams(Params):
    in_channels: int = Field(3, ge=1)
    widths: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64], min_length=1)


class SmallCNN(Backbone):
    """Stages of Conv3x3-BN-ReLU (gate) and Conv3x3-BN-ReLU (feature), then a 2x2 max pool
    between stages. Taps are encoder taps, so MTAN runs on it."""

    def __init__(self, params: SmallCNNParams) -> None:
        super().__init__()
        self.first = nn.ModuleList()
        self.second = nn.ModuleList()
        cin = params.in_channels
        for w in params.widths:
            self.first.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            self.second.append(nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            cin = w
        self.pool = nn.MaxPool2d(2)
        n = len(params.widths)
        self.feature_info = [
            Tap(f"stage{i}", w, w, 2**i, "encoder", pool_after=i < n - 1) for i, w in enumerate(params.widths)
        ]
        self.out_channels = params.widths[-1]
        self.out_stride = 2 ** (n - 1)

    def forward_taps(self, x: Tensor):
        taps = []
        for i, (first, second) in enumerate(zip(self.first, self.second)):
            if i > 0:
                x = self.pool(x)
            gate = first(x)
            x = second(gate)
            taps.append((gate, x))
        return x, taps


@hookimpl
def register_backbones(register):
    register("small_cnn", SmallCNN, params=SmallCNNParams, tiny={"widths": [4, 8]}, description="Small plain CNN (tests, quick starts)")
