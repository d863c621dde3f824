"""Weight initialisation shared by the built-in networks."""

from __future__ import annotations

from torch import nn


def xavier_init(module: nn.Module) -> None:
    """The MTAN reference's initialisation: xavier-normal conv weights, zero conv biases,
    BatchNorm weight 1 and bias 0 (every conv of the model: backbone, attention, f, heads)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
