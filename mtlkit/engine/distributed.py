"""torchrun support: process group, device choice, collective helpers.

Under ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the trainer calls
:func:`setup` which initialises the default process group (gloo on CPU, nccl on CUDA) once,
with one process as with many: ``torchrun --nproc_per_node=1`` runs the distributed path
(DDP, the collectives) over one rank, which is how nccl is exercised on a one-GPU machine.
Every helper here is a no-op in a process outside a group, so the training loop has one
code path.

Data sharding is done by the engine itself (see ``sampling.epoch_plan``), equivalent to
``DistributedSampler(shuffle=True, seed=...)`` with ``set_epoch(epoch)``: each epoch's
permutation is drawn from (seed, epoch), padded to a multiple of the world size, and rank r
takes every world-th index. The engine needs its own version because every rank must also
visit the *same domain* at each step (many-to-many) and skip the same batches on resume.
Evaluation shards without padding (rank r takes indices r, r+world, ...), so no sample
is counted twice; metric states are then all-reduced by SUM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # the process group's ("gloo", "nccl"); None outside one

    @property
    def enabled(self) -> bool:
        """In a process group (one rank or more): DDP and the collectives run."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment (0, 1, 0 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None
    return rank, world, local


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device: \"cuda\" asked for, but no CUDA device is available")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def launched() -> bool:
    """Whether this process is one of a torchrun group (of any size): it joins a process group."""
    return env_world()[1] > 1 or dist.is_torchelastic_launched()


def setup(device_name: str) -> DistContext:
    """Pick the device and, under torchrun (any number of processes), join the process group."""
    rank, world, local = env_world()
    device = resolve_device(device_name, local)
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return DistContext(rank=rank, world_size=world, local_rank=local, device=device)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                       backend=str(dist.get_backend()))


def shutdown() -> None:
    """Leave the process group (the CLI calls this once training and evaluation are over)."""
    if dist.is_initialized():
        # Every rank reaches this point before any tears gloo down: a rank that destroys
        # the group while a peer's last collective is still in flight aborts the peer
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def _comm_tensor(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    # nccl reduces CUDA tensors only; gloo is happy with CPU ones.
    return t.to(ctx.device) if ctx.device.type == "cuda" else t


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
    if not ctx.enabled:
        return t
    buf = _comm_tensor(t.detach().clone(), ctx)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_mean_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average ``t`` over ranks in place (gradients)."""
    if ctx.enabled:
        if t.device.type == ctx.device.type:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(ctx.world_size)
        else:
            t.copy_(all_reduce_sum(t, ctx) / ctx.world_size)
    return t


def any_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on any rank (keeps ranks in lock step on stops)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    the ranks' running statistics differ; evaluation and checkpoints use rank 0's.
    """
    if not ctx.enabled:
        return
    for b in module.buffers():
        buf = _comm_tensor(b.data, ctx)
        dist.broadcast(buf, src=0)
        if buf is not b.data:
            b.data.copy_(buf)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
