"""Data order and seeds: each epoch's batches as a pure function of (seed, epoch, rank,
world size), per-sample seeds, and the named seed streams everything random is drawn from.

Seed streams
------------
Every seed the engine uses is ``Seeds(training.seed).for_(Stream.X, *parts)``: a hash
(numpy's SeedSequence) of the run's seed and integers laid out per stream (``_LAYOUT``),
from the stream's parts, whose number is fixed and checked. No two streams share a seed.
Changing a layout changes data orders: runs would no longer repeat as they did.

Sharding
--------
One-to-many: ``DistributedSampler(shuffle=True)`` semantics (permute, pad by wrapping,
take ``rank::world``). Many-to-many: each domain is shuffled and sharded the same way,
pass after pass, and ``training.domain_order`` interleaves the domains' batches; every
rank visits the same domain (mixed: the same domains) at each step.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import random
import signal
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from .config import TrainingConfig
from .precision import loader_workers

# (domain: None one-to-many, a name, or a tuple of names for a mixed step; [(index, sample seed)])
Plan = list[tuple["str | tuple[str, ...] | None", list[tuple[int, int]]]]


# -- seeds --------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: stable across platforms)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> 1


class Stream(enum.Enum):
    """What a seed is for: (number, the parts it takes). Each stream takes a fixed number of
    integer parts; the number only tells streams apart (values must be unique)."""

    DATA_ORDER = (1, "epoch")  # the one-to-many permutation of the training set
    DOMAIN_ORDER = (2, "epoch, domain index, pass")  # one pass over one domain (many-to-many)
    DOMAIN_PICK = (3, "epoch")  # the domains drawn by domain_order = "proportional"
    SAMPLE_AUGMENT = (4, "epoch, rank")  # each sample's seed (augmentation), in plan order
    TRAINING = (5, "rank")  # the global RNGs (dropout) at the start of a run
    LOADER = (6, "epoch")  # the training DataLoader's generator (worker base seeds)
    RESEED_AFTER_WORLD_CHANGE = (7, "rank, global step")  # resumed with another world size
    EVAL_LOADER = (8, "")  # the evaluation DataLoaders' generator
    BN_STATS = (9, "domain index")  # the pass that recomputes shared BatchNorm statistics (bn_stats)
    EXTRA_BATCH = (10, "epoch, global step, split, rank")  # a weighting's extra batch (StepContext.draw_batch)

    @property
    def parts(self) -> str:
        return self.value[1]

    @property
    def arity(self) -> int:
        """How many integer parts a seed of this stream is drawn from."""
        return len(self.parts.split(", ")) if self.parts else 0


# The integers each stream's seed is mixed from, after the run's seed. They are the ones the
# engine used before its seeds had names, so data orders -- and every result measured on
# them -- stay as they were; except DOMAIN_ORDER's: its old layout (epoch, domain + 1,
# pass) met four other streams (SeedSequence pads with zeros, so (r, 3) = (r, 3, 0): the
# dropout stream of rank r was domain 2's first shuffle of epoch r), so it has its own, and
# many-to-many data orders changed with it. A new stream needs a layout no other can
# produce, zero padding included: e.g. its own last part, 6 or more.
_LAYOUT = {
    Stream.DATA_ORDER: lambda epoch: (epoch, 0, 0),
    Stream.DOMAIN_ORDER: lambda epoch, domain, pass_: (epoch, domain, pass_, 5),
    Stream.DOMAIN_PICK: lambda epoch: (epoch, 0, 1),
    Stream.SAMPLE_AUGMENT: lambda epoch, rank: (epoch, rank, 2),
    Stream.TRAINING: lambda rank: (rank, 3),
    Stream.LOADER: lambda epoch: (epoch, 4),
    Stream.RESEED_AFTER_WORLD_CHANGE: lambda rank, step: (rank, step, 3),
    Stream.BN_STATS: lambda domain: (domain, 6, 6),
    Stream.EXTRA_BATCH: lambda epoch, step, split, rank: (epoch, step, split, rank, 6),
}


class Seeds:
    """The run's seed streams: ``Seeds(seed).for_(Stream.DATA_ORDER, epoch)``."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def for_(self, stream: Stream, *parts: int) -> int:
        if len(parts) != stream.arity:  # a part missing or extra would silently alias streams
            raise TypeError(f"seed stream {stream.name} ({stream.parts or 'no parts'}) takes {stream.arity} "
                            f"part(s), got {len(parts)}")
        if stream is Stream.EVAL_LOADER:
            return self.seed  # evaluation draws nothing itself; its loader has always used the seed as is
        return derive_seed(self.seed, *_LAYOUT[stream](*parts))

    def generator(self, stream: Stream, *parts: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.for_(stream, *parts)))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random (call before building the model)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    # Ctrl-C and SIGTERM are the main process's business: it finishes the step, saves and
    # shuts the workers down; a worker dying of either would turn that into a DataLoader error.
    # Both reach the workers when sent to the whole process group (a terminal's Ctrl-C, GNU
    # timeout, a batch scheduler's preemption), so each worker leaves that group. It must not
    # ignore SIGTERM instead: multiprocessing ends daemonic workers with SIGTERM at the main
    # process's exit and then joins them, and an ignoring worker hangs that exit forever.
    # A worker whose main process is gone exits by itself (DataLoader's watchdog).
    try:
        os.setpgid(0, 0)
    except (AttributeError, OSError):  # no process groups (Windows), or a session leader (EPERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # at least a console's Ctrl-C spares it
    # DataLoader seeds torch per worker from its (seeded) generator; numpy and random follow.
    s = torch.initial_seed()
    np.random.seed(s % 2**32)
    random.seed(s)


def _seed_data_rngs(seed: int) -> None:
    # CPU generator only: torch.manual_seed would also reseed CUDA, the dropout stream on GPU.
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# -- data sets ----------------------------------------------------------------------------------
class SeededSamples(Dataset):
    """``dataset[index]`` with the global RNGs seeded from the sample's own seed (so
    augmentation repeats whatever ``num_workers`` is, and on resume); in the main process
    the training RNG stream (dropout) is restored afterwards."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if get_worker_info() is not None:  # a worker's RNG serves data loading only
            _seed_data_rngs(seed)
            return self.dataset[index]
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            _seed_data_rngs(seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class Concat(Dataset):
    """Domains side by side (global index = domain offset + local index). With ``names``,
    items are ``(domain name, sample)`` (mixed steps: see :func:`collate_by_domain`)."""

    def __init__(self, datasets: list[Dataset], names: list[str] | None = None) -> None:
        self.datasets, self.names = datasets, names
        self.offsets = np.cumsum([0] + [len(d) for d in datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int):
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        sample = self.datasets[d][index - self.offsets[d]]
        return sample if self.names is None else (self.names[d], sample)


def train_dataset(train_data, mixed: bool = False) -> Dataset:
    if isinstance(train_data, Mapping):
        return SeededSamples(Concat(list(train_data.values()), list(train_data) if mixed else None))
    return SeededSamples(train_data)


def collate_by_domain(items: list[tuple[str, dict]]) -> dict[str, dict]:
    """A mixed step's samples ``(domain, sample)`` as ``{domain: batch}`` (plan order)."""
    groups: dict[str, list] = {}
    for name, sample in items:
        groups.setdefault(name, []).append(sample)
    return {name: default_collate(samples) for name, samples in groups.items()}


def set_data_epoch(train_data, epoch: int) -> None:
    """Tell data sets with their own seeded augmentation (``set_epoch``) which epoch this is.

    Such a data set draws its crops and flips from (its seed, epoch, index): without this
    call every epoch would see the same ones. Called before the epoch's loader is made,
    so worker processes get the data set with the epoch already set.
    """
    for ds in train_data.values() if isinstance(train_data, Mapping) else [train_data]:
        if callable(getattr(ds, "set_epoch", None)):
            ds.set_epoch(epoch)


def make_loader(dataset: Dataset, cfg: TrainingConfig, device: torch.device, seed: int, **kw) -> DataLoader:
    # the loader's own generator: making one never draws from the global RNG (dropout stream)
    return DataLoader(dataset, num_workers=loader_workers(cfg.num_workers, device), pin_memory=device.type == "cuda",
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed), **kw)


@contextlib.contextmanager
def loader_batches(dataset: Dataset, cfg: TrainingConfig, device: torch.device, seed: int, **kw) -> Iterator:
    """The batches of ``dataset`` through :func:`make_loader`'s loader; its worker processes
    end when the ``with`` block does, however it ends. Left to garbage collection, an
    exception's traceback (a data error, a failed step, a stop request) keeps the iterator and
    its workers alive for as long as anyone holds the exception: in a notebook, for the rest
    of the session."""
    batches = iter(make_loader(dataset, cfg, device, seed, **kw))
    try:
        yield batches
    finally:
        # DataLoader's multi-process iterator offers no public close; this is what its own
        # __del__ calls. The single-process iterator has no workers to end.
        end_workers = getattr(batches, "_shutdown_workers", None)
        if end_workers is not None:
            end_workers()


# -- the plan of an epoch --------------------------------------------------------------------------
def shard_permutation(n: int, seed: int, rank: int, world: int) -> list[int]:
    """DistributedSampler(shuffle=True) semantics: permute, pad by wrapping, take rank::world."""
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    if world > 1:
        total = math.ceil(n / world) * world
        while len(perm) < total:
            perm += perm[: total - len(perm)]
        perm = perm[rank:total:world]
    return perm


def chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[i:i + size] for i in range(0, len(indices), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


def batch_size(cfg: TrainingConfig, domain: str | None) -> int:
    return cfg.domain_batch_size.get(domain, cfg.batch_size) if domain else cfg.batch_size


def mixed_plan(domains: list[str], per_pass: list[int], passes, chosen: list[str]) -> list:
    """``domain_order = "mixed"``: each step one batch of every domain of the group
    (``chosen``, default all), as ``(tuple of domains, their indices one after another)``.
    An epoch has as many mixed steps as the group's domain with the most batches per pass;
    the others start new passes (freshly shuffled) meanwhile. Domains outside the group
    take steps of their own (1-tuples), in turn with the mixed steps, as round_robin does.
    """
    group = [i for i, d in enumerate(domains) if (not chosen or d in chosen) and per_pass[i] > 0]
    units = ([group] if group else []) + [[i] for i, d in enumerate(domains)
                                           if chosen and d not in chosen and per_pass[i] > 0]
    counts = [max(per_pass[i] for i in u) for u in units]
    its = {i: passes(i) for u in units for i in u}
    plan = []
    for k in range(max(counts, default=0)):
        for u, c in zip(units, counts):
            if k < c:
                plan.append((tuple(domains[i] for i in u), [j for i in u for j in next(its[i])]))
    return plan


def epoch_plan(train_data, cfg: TrainingConfig, epoch: int, rank: int, world: int) -> Plan:
    """This rank's batches of ``epoch``: (domain or None, [(index, sample seed), ...]).

    Indices are into the training set (many-to-many: into the domains side by side).
    """
    seeds = Seeds(cfg.seed)
    plan: list[tuple[str | None, list[int]]] = []
    if not isinstance(train_data, Mapping):
        perm = shard_permutation(len(train_data), seeds.for_(Stream.DATA_ORDER, epoch), rank, world)
        plan = [(None, b) for b in chunks(perm, cfg.batch_size, cfg.drop_last)]
    else:
        domains = list(train_data)
        sizes = [len(train_data[d]) for d in domains]
        offsets = np.cumsum([0] + sizes).tolist()

        def passes(i: int):
            """Endless batches of domain i: pass after pass, each freshly shuffled."""
            r = 0
            while True:
                perm = shard_permutation(sizes[i], seeds.for_(Stream.DOMAIN_ORDER, epoch, i, r), rank, world)
                batches = chunks([offsets[i] + j for j in perm], batch_size(cfg, domains[i]), cfg.drop_last)
                if not batches:
                    return
                yield from batches
                r += 1

        per_pass = [len(chunks(list(range(math.ceil(n / world))), batch_size(cfg, d), cfg.drop_last))
                    for n, d in zip(sizes, domains)]
        if cfg.domain_order == "mixed":
            plan = mixed_plan(domains, per_pass, passes, cfg.mixed_domains)
        elif cfg.domain_order == "sequential":
            for i, d in enumerate(domains):
                it = passes(i)
                plan += [(d, next(it)) for _ in range(per_pass[i])]
        elif cfg.domain_order == "round_robin":
            its = [passes(i) for i in range(len(domains))]
            for k in range(max(per_pass)):
                plan += [(d, next(its[i])) for i, d in enumerate(domains) if k < per_pass[i]]
        else:  # proportional: as many batches as one pass over all; domain drawn by size^(1/T)
            w = np.array(sizes, dtype=np.float64) ** (1.0 / cfg.proportional_temperature)
            picks = seeds.generator(Stream.DOMAIN_PICK, epoch).choice(len(domains), size=sum(per_pass),
                                                                       p=w / w.sum())
            its = [passes(i) for i in range(len(domains))]
            plan = [(domains[i], next(its[i])) for i in picks.tolist() if per_pass[i] > 0]
    if cfg.max_steps_per_epoch is not None:
        plan = plan[: cfg.max_steps_per_epoch]
    total = sum(len(b) for _, b in plan)
    sample_seeds = seeds.generator(Stream.SAMPLE_AUGMENT, epoch, rank).integers(0, 2**62, size=total).tolist()
    out, k = [], 0
    for d, b in plan:
        out.append((d, list(zip(b, sample_seeds[k:k + len(b)]))))
        k += len(b)
    return out
