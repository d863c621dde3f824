"""Split (hard sharing): one shared backbone, one head per task on its final features."""

from __future__ import annotations

from torch import Tensor, nn

from mtlkit.contracts import MultiTaskNetwork, activate_task, expose
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class SplitParams(Params):
    """No parameters."""


class SplitNetwork(MultiTaskNetwork):
    representation = "the shared backbone's final feature map (B x C x H x W), which every head reads"

    def __init__(self, params: SplitParams, backbone, heads, tasks) -> None:
        super().__init__()
        self.task_names = list(tasks)
        self.backbone = backbone()
        self.heads = nn.ModuleDict({t: heads[t](self.backbone.out_channels) for t in self.task_names})

    def forward(self, x: Tensor, tasks: list[str] | None = None, representation_hook=None) -> dict[str, Tensor]:
        tasks = tasks or self.task_names
        if len(tasks) == 1:
            activate_task(self.backbone, tasks[0])  # domain-specific layers, if any
        (features,) = expose(representation_hook, [self.backbone(x)])
        return {t: self.heads[t](features) for t in tasks}


@hookimpl
def register_attention(register):
    register("split", SplitNetwork, params=SplitParams,
             description="Hard sharing: one backbone, a head per task (Split)")
