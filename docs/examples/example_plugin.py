"""An example third-party plugin: one component of every kind.

Load it from a recipe (``plugins = ["docs/examples/example_plugin.py"]``), from a package's
``mtlkit`` entry point, or in Python with ``mtlkit.get_plugin_manager().register(module)``.
tests/test_example_plugin.py runs all three ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from mtlkit import hookimpl
from mtlkit.contracts import Backbone, MetricState, MultiTaskNetwork, Tap, Task, Weighting
from mtlkit.registry import Params


# -- a backbone: two convolutions, honouring the feature contract ---------------------------
class TinyConvParams(Params):  # unknown keys, NaN and mistyped values are errors
    width: int = Field(8, ge=1, description="channels of both convolutions")


class TinyConv(Backbone):
    def __init__(self, params: TinyConvParams) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, params.width, 3, padding=1)
        self.conv2 = nn.Conv2d(params.width, params.width, 3, padding=1)
        self.out_channels, self.out_stride = params.width, 1
        self.feature_info = [Tap("conv", params.width, params.width, 1, "encoder")]

    def forward_taps(self, x):
        gate = torch.relu(self.conv1(x))
        feature = torch.relu(self.conv2(gate))
        return feature, [(gate, feature)]


# -- a head: a 1x1 convolution ---------------------------------------------------------------
class PointwiseHead(nn.Module):
    """A 1x1 convolution to the task's channels."""

    def __init__(self, params, in_channels: int, task: Task) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, task.out_channels, 1)

    def forward(self, x):
        return self.conv(x)


# -- an attention plugin: every task reads the shared features through its own gate ---------
class GatedSharing(MultiTaskNetwork):
    """One backbone; each task multiplies the final features by a learned per-channel gate."""

    def __init__(self, params, backbone, heads, tasks) -> None:
        super().__init__()
        self.task_names = list(tasks)
        self.backbone = backbone()
        c = self.backbone.out_channels
        self.task_specific = nn.ParameterDict({t: nn.Parameter(torch.ones(1, c, 1, 1)) for t in tasks})
        self.heads = nn.ModuleDict({t: heads[t](c) for t in tasks})

    def forward(self, x, tasks=None):
        f = self.backbone(x)
        return {t: self.heads[t](f * torch.sigmoid(self.task_specific[t])) for t in (tasks or self.task_names)}


# -- a task: per-pixel L2 regression, with a whole-split mean squared error -----------------
class MSEState(MetricState):
    higher_is_better = {"mse": False}

    def __init__(self) -> None:
        super().__init__()
        self.state = {"sq": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)}

    def update(self, prediction, target):
        self.state["sq"] += ((prediction.detach() - target) ** 2).sum().double().cpu()
        self.state["n"] += target.numel()

    def compute(self):
        return {"mse": float(self.state["sq"] / self.state["n"])}


class RegressionParams(Params):
    target: str = "brightness"


class Regression(Task):
    out_channels = 1

    def __init__(self, params: RegressionParams, name: str) -> None:
        self.name, self.target = name, params.target

    def loss(self, prediction, target):
        return F.mse_loss(prediction, target)

    def metrics(self):
        return MSEState()


# -- a weighting: weights proportional to each loss's share (detached) -----------------------
class LossShare(Weighting):
    """Weights K * L_k / sum(L): harder tasks (larger losses) count more."""

    def __init__(self, params, task_names: list[str]) -> None:
        super().__init__(task_names)

    def combine(self, losses):
        values = torch.stack([losses[t] for t in self.task_names])
        w = len(values) * values.detach() / values.detach().sum()
        self._last = dict(zip(self.task_names, w.tolist()))
        return (w * values).sum()

    def weights(self):
        return getattr(self, "_last", super().weights())


# -- a data set: random images; targets are per-pixel brightness and its negative -----------
class NoiseParams(Params):
    size: int = Field(8, ge=2)
    n: int = Field(16, ge=1)


class NoiseImages(Dataset):
    def __init__(self, params: NoiseParams, split: str) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.images = torch.rand(params.n, 3, params.size, params.size, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        brightness = image.mean(0, keepdim=True)
        return {"image": image, "brightness": brightness, "darkness": -brightness}


# -- the hooks ---------------------------------------------------------------------------------
@hookimpl
def register_backbones(register):
    register("tiny_conv", TinyConv, params=TinyConvParams, description="Two 3x3 convolutions (example)")


@hookimpl
def register_heads(register):
    register("pointwise", PointwiseHead)


@hookimpl
def register_attention(register):
    register("gated", GatedSharing, description="Per-task channel gates on shared features (example)")


@hookimpl
def register_tasks(register):
    register("regression", Regression, params=RegressionParams, description="Per-pixel MSE (example)")


@hookimpl
def register_weightings(register):
    register("loss_share", LossShare, description="Weights proportional to each loss (example)")


@hookimpl
def register_datasets(register):
    register("noise_images", NoiseImages, params=NoiseParams, description="Random images (example)")
