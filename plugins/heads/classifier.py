"""Classification head: global average pooling, then one linear layer."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from mtlkit.contracts import Task, apply_activation
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class ClassifierParams(Params):
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ClassifierHead(nn.Module):
    def __init__(self, params: ClassifierParams, in_channels: int, task: Task) -> None:
        super().__init__()
        self.activation = task.output_activation
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(params.dropout) if params.dropout else nn.Identity()
        self.fc = nn.Linear(in_channels, task.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = self.pool(x).flatten(1)
        return apply_activation(self.activation, self.fc(self.dropout(x)))


@hookimpl
def register_heads(register):
    register("classifier", ClassifierHead, params=ClassifierParams,
             description="Global average pool + linear layer (classification)")
