"""Single-task baselines: an independent network per task, nothing shared.

``inner = "none"``: One Task (one backbone + head per task). ``inner = "mtan"``: STAN, a
single-task attention network (MTAN with one task) per task. Every parameter belongs to one
task, so ``shared_parameters()`` is empty.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from mtlkit.contracts import MultiTaskNetwork, activate_task
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params


class SingleParams(Params):
    inner: Literal["none", "mtan"] = "none"


class SingleTaskNetworks(MultiTaskNetwork):
    def __init__(self, params: SingleParams, backbone, heads, tasks) -> None:
        super().__init__()
        self.task_names = list(tasks)
        self.inner = params.inner
        nets, task_heads = {}, {}
        for t in self.task_names:
            if params.inner == "mtan":
                from mtlkit.plugins.attention.mtan import MTANNetwork, MTANParams

                # the inner MTAN ends in an identity "head": the real head lives in self.heads,
                # so every parameter is listed exactly once (task_parameters does not de-duplicate)
                net = MTANNetwork(MTANParams(), backbone, {t: lambda c: nn.Identity()}, {t: tasks[t]})
                out_channels = net.out_channels
            else:
                net = backbone()
                out_channels = net.out_channels
            nets[t] = net
            task_heads[t] = heads[t](out_channels)
        self.task_specific = nn.ModuleDict(nets)
        self.heads = nn.ModuleDict(task_heads)

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        out = {}
        for t in tasks or self.task_names:
            net = self.task_specific[t]
            activate_task(net, t)  # the network serves only t
            feats = net(x)[t] if self.inner == "mtan" else net(x)
            out[t] = self.heads[t](feats)
        return out


def build_single(params: SingleParams, backbone, heads, tasks) -> SingleTaskNetworks:
    """One independent network per task (One Task; inner="mtan": STAN)."""
    return SingleTaskNetworks(params, backbone, heads, tasks)


@hookimpl
def register_attention(register):
    register("single", build_single, params=SingleParams,
             description="An independent network per task: One Task, or STAN with inner='mtan'")
