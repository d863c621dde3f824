"""Heads return raw scores; the build path applies the task's output activation, and a dense
head on a strided encoder upsamples to the input's resolution."""

from __future__ import annotations

import torch
from torch import nn

import mtlkit
from mtlkit.build import build_tasks
from mtlkit.contracts import Task


class RawHead(nn.Module):
    """The docs' example head: a 1x1 convolution, no activation."""

    def __init__(self, params, in_channels: int, task: Task) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, task.out_channels, 1)

    def forward(self, x):
        return self.conv(x)


def test_a_raw_head_gets_its_tasks_activation(fresh_pm):
    fresh_pm.registry.register("head", "raw_test_head", RawHead, plugin="test")
    tasks = build_tasks({"segmentation": ("segmentation", {"num_classes": 5}), "normal": "normal"})
    model = mtlkit.compose(backbone=("small_cnn", {"widths": [4, 8]}), attention="split", tasks=tasks,
                           head="raw_test_head")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    # log-probabilities: exp sums to one over classes, and the NLL loss is non-negative
    torch.testing.assert_close(out["segmentation"].exp().sum(1), torch.ones(2, 8, 8))
    labels = torch.randint(0, 5, (2, 8, 8))
    assert float(tasks["segmentation"].loss(out["segmentation"], labels).detach()) >= 0
    # unit normals
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 8, 8))
    # the head itself is raw: its own module output is not normalised
    raw = model.heads["segmentation"].conv(model.backbone(x))
    assert not torch.allclose(raw.exp().sum(1), torch.ones_like(raw[:, 0]))


def test_mtan_on_a_timm_encoder_predicts_per_pixel():
    tasks = build_tasks({"segmentation": ("segmentation", {"num_classes": 4}), "depth": "depth"})
    torch.manual_seed(0)
    model = mtlkit.compose(backbone=("timm", {"name": "test_resnet"}), attention="mtan", tasks=tasks)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["segmentation"].shape == (2, 4, 64, 64)
    assert out["depth"].shape == (2, 1, 64, 64)
    seg = torch.randint(0, 4, (2, 64, 64))
    depth = torch.rand(2, 1, 64, 64) + 0.5
    loss = tasks["segmentation"].loss(out["segmentation"], seg) + tasks["depth"].loss(out["depth"], depth)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
