"""Dense: a shared network plus one full network per task fed with the shared features.

Each task network's stage ``i > 0`` reads ``cat(task's stage input, shared network's stage
input)``: for an encoder stage the pooled outputs of the previous level, for a decoder stage
the unpooled features (each network unpools with its own indices). Stage 0 reads the image.

No shared stage output beyond the second-last stage is read by any task, so the shared
network's last stage body is dropped: the model holds no parameters that never act. (The
reference keeps that stage, with 13 output channels; see tests/test_param_counts.py.)

Needs a staged backbone with the Dense extension (``stage_input``, ``stage_body``,
``with_stage_extra()``; segnet has them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit.contracts import MultiTaskNetwork, StagedBackbone, activate_task
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class DenseParams(Params):
    """No parameters."""


class DenseNetwork(MultiTaskNetwork):
    def __init__(self, params: DenseParams, backbone, heads, tasks) -> None:
        super().__init__()
        self.task_names = list(tasks)
        shared = backbone()
        if not isinstance(shared, StagedBackbone) or not all(
            hasattr(shared, m) for m in ("stage_input", "stage_body", "with_stage_extra", "discard_stage_body")
        ):
            raise ConfigError(
                f"model.attention: 'dense' needs a backbone that runs stage by stage and accepts extra "
                f"stage inputs (e.g. segnet); {type(shared).__name__} does not"
            )
        self.num_stages = shared.num_stages
        shared.discard_stage_body(self.num_stages - 1)
        self.backbone = shared
        self.task_specific = nn.ModuleDict({t: shared.with_stage_extra() for t in self.task_names})
        self.heads = nn.ModuleDict(
            {t: heads[t](self.task_specific[t].out_channels) for t in self.task_names}
        )

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        tasks = list(tasks or self.task_names)
        if len(tasks) == 1:
            activate_task(self.backbone, tasks[0])
        for t in tasks:
            activate_task(self.task_specific[t], t)
        sh_state: dict = {}
        states = {t: {} for t in tasks}
        shared = x
        feats = {t: x for t in tasks}
        for i in range(self.num_stages):
            sh_in = self.backbone.stage_input(i, shared, sh_state)
            for t in tasks:
                net = self.task_specific[t]
                t_in = net.stage_input(i, feats[t], states[t])
                feats[t] = net.stage_body(i, t_in if i == 0 else torch.cat((t_in, sh_in), dim=1), states[t])
            if i < self.num_stages - 1:
                shared = self.backbone.stage_body(i, sh_in, sh_state)
        return {t: self.heads[t](feats[t]) for t in tasks}


def build_dense(params: DenseParams, backbone, heads, tasks) -> DenseNetwork:
    """Dense: shared network + a full network per task reading its stage inputs."""
    return DenseNetwork(params, backbone, heads, tasks)


@hookimpl
def register_attention(register):
    register("dense", build_dense, params=DenseParams,
             description="Dense: shared network + a network per task fed all shared features")
