"""MTAN: one shared backbone plus, per task, a soft-attention network over its taps.

Generic over the feature contract (:mod:`mtlkit.contracts`), so it runs on SegNet (5 encoder
+ 5 decoder taps), the Decathlon WRN and small_cnn (encoder taps only) and timm models.

For each tap ``j`` and task ``t``, with ``prev`` the task's previous attention output:

- encoder tap: ``mask = a_t_j(gate)`` (first tap) or ``a_t_j(cat(gate, prev))``;
  ``prev = f_j(mask * feature)``, then a 2x2 max pool if ``pool_after``;
- decoder tap: ``up = f_j(upsample(prev))`` (bilinear, align_corners=True, to the feature's
  size); ``prev = a_t_j(cat(gate, up)) * feature``.

``a(in, mid, out)`` is Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid (per task); ``f_j`` is
Conv3x3-BN-ReLU shared by all tasks (an encoder ``f_j`` maps the tap's channels to the next
tap's; a decoder ``f_j`` maps the previous output's channels to the tap's). The last ``prev``
goes to the task's head. The shared backbone runs once per forward pass.

``fast=True`` computes the same function faster (see :class:`FastMTANBranches`): the shared
f convs run once over all tasks' features stacked along the batch, with BatchNorm statistics
kept per task chunk exactly as in the per-task loop, and each level's per-task 1x1 attention
convs run as one grouped conv. Its parameters and state dict have the same names and shapes
as the plain path, so checkpoints move between the two.

``memory_efficient=True`` computes the same function with much less memory (full-size NYUv2
MTAN step: about 4 GB peak instead of 8-9 GB): each task's branch runs level by level, every
level (attention module + shared f + pool) under non-reentrant activation checkpointing
(``torch.utils.checkpoint``), so the backward pass recomputes one task's level at a time
instead of keeping every level's intermediates from the forward pass. It takes precedence
over ``fast``: batching the K tasks would make each recomputed segment K times larger (a
batched checkpointed variant peaked at about 5 GB) and, under checkpointing, measured no
faster on this CPU. A recomputation must not count a
training batch in BatchNorm twice: the buffers of the segment's modules (running mean/var,
``num_batches_tracked``) are put back as they were after each recomputation. Off by default:
it costs about one more forward pass of the attention branches per step (+25% step time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtlkit.contracts import MultiTaskNetwork, Tap, activate_task, expose
from mtlkit.errors import ConfigError
from mtlkit.hookspecs import hookimpl
from mtlkit.init import xavier_init
from mtlkit.registry import Params


class MTANParams(Params):
    # batched shared f convs + grouped attention convs (same function); "auto": on CUDA inputs
    # only (measured faster there; on CPUs no faster than the loop: docs/performance.md)
    fast: Union[Literal["auto"], bool] = False
    channels_last: bool = False  # run the model in channels-last memory format
    # recompute each task's attention level in the backward pass (activation checkpointing):
    # the same function, outputs, gradients and BatchNorm statistics, about half the memory;
    # takes precedence over ``fast``
    memory_efficient: bool = False


def attention_module(cin: int, mid: int, cout: int) -> nn.Sequential:
    """The paper's g (Conv1x1-BN-ReLU) then h (Conv1x1-BN-Sigmoid)."""
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
    )


def shared_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def plan_levels(info: list[Tap]) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]], int]:
    """Shapes from the taps: f convs (in, out), attention modules (in, mid, out), and the
    channels of the final attended feature."""
    if not info:
        raise ConfigError("model.attention: 'mtan' needs a backbone with taps (feature_info)")
    if info[0].role != "encoder":
        raise ConfigError("model.attention: 'mtan' needs the backbone's first tap to be an encoder tap")
    f_shapes, a_shapes = [], []
    prev = None  # channels of the task's previous attention output
    for j, tap in enumerate(info):
        c = tap.channels
        if tap.role == "encoder":
            a_in = tap.gate_channels if prev is None else tap.gate_channels + prev
            nxt = info[j + 1].channels if j + 1 < len(info) else c
            a_shapes.append((a_in, c, c))
            f_shapes.append((c, nxt))
            prev = nxt
        elif tap.role == "decoder":
            f_shapes.append((prev, c))
            a_shapes.append((tap.gate_channels + c, c, c))
            prev = c
        else:
            raise ConfigError(f"model.attention: unknown tap role '{tap.role}' in backbone tap '{tap.name}'")
    return f_shapes, a_shapes, prev


def _momentum(bn: nn.BatchNorm2d) -> float:
    """Count one training batch on ``bn`` and return its running-stat factor, as
    ``nn.BatchNorm2d.forward`` does (momentum None: cumulative average)."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def pool_to(x: Tensor, next_gate: Tensor | tuple[int, int] | None) -> Tensor:
    """The 2x2 max pool after a level; if the next encoder gate (or its spatial size) has
    another size (odd input sizes, a backbone level that shrinks by more than 2), pool to
    exactly that size."""
    out = F.max_pool2d(x, 2, 2)
    size = next_gate.shape[-2:] if isinstance(next_gate, Tensor) else next_gate
    if size is not None and tuple(out.shape[-2:]) != tuple(size):
        out = F.adaptive_max_pool2d(x, size)
    return out


def _next_pool_size(taps_info: list[Tap], taps: list[tuple[Tensor, Tensor]], j: int) -> tuple[int, int] | None:
    """Spatial size the pool after encoder level ``j`` must reach (the next encoder gate's)."""
    if j + 1 < len(taps) and taps_info[j + 1].role == "encoder":
        return tuple(taps[j + 1][0].shape[-2:])
    return None


class _BuffersRestored:
    """On exit, put the modules' buffers back as they were on entry: a checkpoint
    recomputation must not count a training batch in BatchNorm a second time. Re-enterable:
    checkpoint enters the same object once per recomputation (once per backward pass over
    a retained graph)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(b, b.clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc) -> bool:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        self.saved = []
        return False


def checkpointed(fn: Callable, modules: list[nn.Module], *args):
    """``fn(*args)`` under non-reentrant activation checkpointing; the recomputation in the
    backward pass leaves the BatchNorm buffers of ``modules`` untouched. Under torch.compile
    the plain checkpoint: dynamo cannot trace a custom ``context_fn``, and AOT autograd applies
    buffer updates once whatever the partitioner recomputes."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _BuffersRestored(modules)))


class MTANNetwork(MultiTaskNetwork):
    representation = ("the backbone's taps: every level's gate and feature tensors (B x C x H x W each), "
                      "which every task's attention branch reads; the shared f convs come after it")

    def __init__(self, params: MTANParams, backbone, heads, tasks) -> None:
        super().__init__()
        self.params = params
        self.task_names = list(tasks)
        self.backbone = backbone()
        info = getattr(self.backbone, "feature_info", None)
        if not info or not hasattr(self.backbone, "forward_taps"):
            raise ConfigError(
                f"model.attention: 'mtan' needs a backbone with taps (feature_info + forward_taps); "
                f"{type(self.backbone).__name__} has none"
            )
        self.taps: list[Tap] = list(info)
        f_shapes, a_shapes, out_c = plan_levels(self.taps)
        self.shared_f = nn.ModuleList([shared_conv(i, o) for i, o in f_shapes])
        self.task_specific = nn.ModuleDict({
            t: nn.ModuleList([attention_module(*s) for s in a_shapes]) for t in self.task_names
        })
        xavier_init(self.shared_f)
        xavier_init(self.task_specific)
        self.heads = nn.ModuleDict({t: heads[t](out_c) for t in self.task_names})
        self.out_channels = out_c
        self._fast = FastMTANBranches(self) if params.fast is not False else None
        if params.channels_last:
            self.to(memory_format=torch.channels_last)

    # the per-task loop: the reference computation
    def branch_level(self, task: str, j: int, gate: Tensor, feat: Tensor, prev: Tensor | None,
                     pool_size: tuple[int, int] | None = None) -> Tensor:
        """Level ``j`` of task ``task``'s attention branch: the task's next ``prev``."""
        tap, att = self.taps[j], self.task_specific[task][j]
        if tap.role == "encoder":
            mask = att(gate if prev is None else torch.cat((gate, prev), dim=1))
            prev = self.shared_f[j](mask * feat)
            if tap.pool_after:
                prev = pool_to(prev, pool_size)
            return prev
        up = F.interpolate(prev, size=feat.shape[-2:], mode="bilinear", align_corners=True)
        up = self.shared_f[j](up)
        return att(torch.cat((gate, up), dim=1)) * feat

    def branch(self, task: str, taps: list[tuple[Tensor, Tensor]]) -> Tensor:
        prev = None
        for j, (gate, feat) in enumerate(taps):
            size = _next_pool_size(self.taps, taps, j)
            if self.params.memory_efficient:
                prev = checkpointed(self.branch_level, [self.task_specific[task][j], self.shared_f[j]],
                                    task, j, gate, feat, prev, size)
            else:
                prev = self.branch_level(task, j, gate, feat, prev, size)
        return prev

    def forward(self, x: Tensor, tasks: list[str] | None = None, representation_hook=None) -> dict[str, Tensor]:
        tasks = list(tasks or self.task_names)
        if len(tasks) == 1:
            activate_task(self.backbone, tasks[0])
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, taps = self.backbone.forward_taps(x)
        if representation_hook is not None:
            flat = expose(representation_hook, [t for pair in taps for t in pair])
            taps = list(zip(flat[0::2], flat[1::2]))
        batched = self._fast is not None and (self.params.fast is True or x.is_cuda)
        if batched and len(tasks) > 1 and not self.params.memory_efficient:
            feats = self._fast(tasks, taps)
        else:
            feats = {t: self.branch(t, taps) for t in tasks}
        return {t: self.heads[t](feats[t]) for t in tasks}


class FastMTANBranches:
    """All requested tasks' attention branches at once (the same function as the loop).

    - The shared f convs run once on the tasks' features stacked along the batch (K*B).
      The conv is the same per sample; BatchNorm is not, because the loop normalises each
      task's features with that task's own batch statistics and updates the running stats
      once per task. So the BN here runs ``F.batch_norm`` on a view with the K task chunks
      folded into the channel axis (B x K*C): per-chunk statistics, and running stats
      updated once per task in task order, exactly like K separate calls.
    - Each level's per-task attention 1x1 convs become one grouped conv over the tasks'
      inputs stacked along channels (B x K*Cin), with the tasks' weights concatenated.
    Not a module: it reads the network's own parameters, so names and checkpoints match.
    """

    def __init__(self, net: MTANNetwork) -> None:
        self.net = net

    @staticmethod
    def _chunked_bn(bn: nn.BatchNorm2d, x: Tensor, k: int) -> Tensor:
        """BN of ``x`` (K*B x C x H x W) with statistics per task chunk of B samples."""
        kb, c, h, w = x.shape
        b = kb // k
        if bn.training:
            # One F.batch_norm per chunk keeps the running-stat updates identical to the loop
            # (sequential momentum updates); the normalisation itself is elementwise work.
            # (split, not slicing: a slice's backward allocates a zero gradient of x's full size
            # per chunk; split's backward concatenates the chunks' gradients once)
            outs = [F.batch_norm(xc, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, _momentum(bn),
                                 bn.eps) for xc in x.split(b, 0)]
            return torch.cat(outs, 0)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def _shared(self, f: nn.Sequential, x: Tensor, k: int) -> Tensor:
        conv, bn = f[0], f[1]
        return F.relu_(self._chunked_bn(bn, conv(x), k))  # BN's backward reads its input, not its output

    def _grouped_conv(self, convs: list[nn.Conv2d], x: Tensor) -> Tensor:
        weight = torch.cat([c.weight for c in convs], 0)
        bias = torch.cat([c.bias for c in convs], 0)
        return F.conv2d(x, weight, bias, groups=len(convs))

    @staticmethod
    def _grouped_bn(bns: list[nn.BatchNorm2d], x: Tensor) -> Tensor:
        # tasks stacked on channels: every task's BN sees exactly its own channels, so one
        # call with concatenated buffers is the same as K calls; running stats are written back
        bn0 = bns[0]
        training = bn0.training
        rm = torch.cat([b.running_mean for b in bns])
        rv = torch.cat([b.running_var for b in bns])
        momentum = 0.0
        if training:
            for b in bns[1:]:
                _momentum(b)  # count the batch on every task's BN, as K calls would
            momentum = _momentum(bn0)
        out = F.batch_norm(x, rm, rv, torch.cat([b.weight for b in bns]), torch.cat([b.bias for b in bns]),
                           training, momentum, bn0.eps)
        if training:
            with torch.no_grad():
                for i, b in enumerate(bns):
                    c = b.num_features
                    b.running_mean.copy_(rm[i * c:(i + 1) * c])
                    b.running_var.copy_(rv[i * c:(i + 1) * c])
        return out

    def _attention(self, mods: list[nn.Sequential], x: Tensor) -> Tensor:
        """All tasks' a(in, mid, out) on x = cat of the tasks' inputs on channels (B x K*in)."""
        y = self._grouped_conv([m[0] for m in mods], x)
        y = F.relu_(self._grouped_bn([m[1] for m in mods], y))
        y = self._grouped_conv([m[3] for m in mods], y)
        return torch.sigmoid_(self._grouped_bn([m[4] for m in mods], y))

    def level(self, tasks: list[str], j: int, gate: Tensor, feat: Tensor, prev: Tensor | None,
              pool_size: tuple[int, int] | None = None) -> Tensor:
        """Level ``j`` for all tasks: the next ``prev`` (K*B x C x H x W, task chunks along
        the batch)."""
        net = self.net
        k, b = len(tasks), gate.shape[0]
        tap, f = net.taps[j], net.shared_f[j]
        mods = [net.task_specific[t][j] for t in tasks]
        if tap.role == "encoder":
            if prev is None:
                # identical input for every task: repeat along channels for the grouped conv
                a_in = gate.repeat(1, k, 1, 1)
            else:
                a_in = torch.cat([torch.cat((gate, p), 1) for p in prev.split(b, 0)], 1)
            mask = self._attention(mods, a_in)  # B x K*C
            del a_in
            masked = torch.cat([mc * feat for mc in mask.chunk(k, 1)], 0)  # K*B x C
            del mask
            prev = self._shared(f, masked, k)
            if tap.pool_after:
                prev = pool_to(prev, pool_size)
            return prev
        up = F.interpolate(prev, size=feat.shape[-2:], mode="bilinear", align_corners=True)
        up = self._shared(f, up, k)
        a_in = torch.cat([torch.cat((gate, u), 1) for u in up.split(b, 0)], 1)
        del up
        mask = self._attention(mods, a_in)
        del a_in
        return torch.cat([mc * feat for mc in mask.chunk(k, 1)], 0)

    def __call__(self, tasks: list[str], taps: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        net = self.net
        k = len(tasks)
        prev = None  # K*B x C x H x W, task chunks along the batch
        for j, (gate, feat) in enumerate(taps):
            prev = self.level(tasks, j, gate, feat, prev, _next_pool_size(net.taps, taps, j))
        return dict(zip(tasks, prev.split(prev.shape[0] // k, 0)))


def build_mtan(params: MTANParams, backbone, heads, tasks) -> MTANNetwork:
    """MTAN: shared backbone + per-task attention modules on every tap."""
    return MTANNetwork(params, backbone, heads, tasks)


@hookimpl
def register_attention(register):
    register("mtan", build_mtan, params=MTANParams,
             description="MTAN: per-task soft attention over a shared backbone's taps")
