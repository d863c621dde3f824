"""Classification head: global average pooling, then one linear layer (raw scores: the build
path applies the task's log-softmax)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlkit.contracts import Task
from mtlkit.hookspecs import hookimpl


class ClassifierParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ClassifierHead(nn.Module):
    def __init__(self, params: ClassifierParams, in_channels: int, task: Task) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(params.dropout) if params.dropout else nn.Identity()
        self.fc = nn.Linear(in_channels, task.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = self.pool(x).flatten(1)
        return self.fc(self.dropout(x))


@hookimpl
def register_heads(register):
    register("classifier", ClassifierHead, params=ClassifierParams,
             description="Global average pool + linear layer (classification)")
