"""Cross-Stitch networks (Misra et al., CVPR 2016): one full network per task, with a
learned K x K mixing unit after every stage but the last.

Unit ``u`` computes, for each target task ``t``, ``y_t = sum_s alpha_u[t, s] * x_s`` over
the K tasks' stage outputs (the original paper's matrix form: every target task has its own
mixture). On SegNet that is after each encoder level's pooled output and after decoder
stages 1..4, i.e. before the encoder levels 1..4 and all 5 decoder levels (9 units). Each
task network pools and unpools with its own indices.

Init: ``alpha[t, t] = self_weight`` (0.9), ``alpha[t, s] = (1 - self_weight) / (K - 1)``
(0.1 / (K - 1)), so each task starts mostly on its own features and every row sums to 1.
(The reference code instead uses one weight per source task, shared by all targets, and
initialises them to 1; we do not copy that simplification.)
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlkit.contracts import MultiTaskNetwork, StagedBackbone, activate_task
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class CrossStitchParams(Params):
    self_weight: float = Field(0.9, ge=0.0, le=1.0)


def stitch_init(k: int, self_weight: float) -> Tensor:
    if k == 1:
        return torch.ones(1, 1)
    alpha = torch.full((k, k), (1.0 - self_weight) / (k - 1))
    alpha.fill_diagonal_(self_weight)
    return alpha


class CrossStitchNetwork(MultiTaskNetwork):
    def __init__(self, params: CrossStitchParams, backbone, heads, tasks) -> None:
        super().__init__()
        self.task_names = list(tasks)
        nets = {}
        for t in self.task_names:
            net = backbone()
            if not isinstance(net, StagedBackbone):
                raise ConfigError(
                    f"model.attention: 'cross_stitch' needs a backbone that runs stage by stage "
                    f"(StagedBackbone, e.g. segnet); {type(net).__name__} does not"
                )
            nets[t] = net
        self.task_specific = nn.ModuleDict(nets)
        first = nets[self.task_names[0]]
        self.num_stages = first.num_stages
        k = len(self.task_names)
        # shared: each unit mixes every task's features
        self.stitch = nn.ParameterList(
            [nn.Parameter(stitch_init(k, params.self_weight)) for _ in range(self.num_stages - 1)]
        )
        self.heads = nn.ModuleDict({t: heads[t](nets[t].out_channels) for t in self.task_names})

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        tasks = list(tasks or self.task_names)
        for t in self.task_names:
            activate_task(self.task_specific[t], t)
        states = {t: {} for t in self.task_names}
        feats = [x] * len(self.task_names)
        for i in range(self.num_stages - 1):
            # every task's features feed every unit, so all networks run up to the last unit
            outs = [self.task_specific[t].run_stage(i, f, states[t]) for t, f in zip(self.task_names, feats)]
            stacked = torch.stack(outs, 0)  # K x B x C x H x W
            mixed = torch.einsum("ts,s...->t...", self.stitch[i], stacked)
            feats = list(mixed.unbind(0))
        last = self.num_stages - 1
        out = {}
        for t, f in zip(self.task_names, feats):
            if t in tasks:
                out[t] = self.heads[t](self.task_specific[t].run_stage(last, f, states[t]))
        return {t: out[t] for t in tasks}


def build_cross_stitch(params: CrossStitchParams, backbone, heads, tasks) -> CrossStitchNetwork:
    """Cross-Stitch: a network per task, K x K mixing units between stages."""
    return CrossStitchNetwork(params, backbone, heads, tasks)


@hookimpl
def register_attention(register):
    register("cross_stitch", build_cross_stitch, params=CrossStitchParams,
             description="Cross-Stitch: a network per task mixed by K x K units between stages")
