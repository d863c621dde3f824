"""A loader's worker processes end with the loop that reads it, however the loop ends.

Left to garbage collection, an exception's traceback keeps the iterator, and with it the
workers, alive: in the test suite they outlived the test that raised, and at the suite's exit
(with workers that ignored SIGTERM then) they hung it for good."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.sampling import loader_batches, make_loader


class BrokenAt(torch.utils.data.Dataset):
    def __init__(self, bad: int):
        self.bad = bad

    def __len__(self):
        return 32

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"sample {i} is broken")
        return torch.tensor(float(i))


# two workers, batches of two, as the engine makes its loaders
WORKERS = dict(cfg=TrainingConfig(num_workers=2), device=torch.device("cpu"), seed=0, batch_size=2)


def live_workers(before: set[int]) -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.pid not in before]


@pytest.mark.timeout(120)
def test_workers_end_when_a_sample_fails_while_the_error_is_held():
    before = {p.pid for p in multiprocessing.active_children()}
    seen = []
    with pytest.raises(ValueError, match="sample 9 is broken") as held:
        with loader_batches(BrokenAt(9), **WORKERS) as batches:
            for batch in batches:
                seen.append(batch)
    assert held.value.__traceback__ is not None  # the traceback, frames and all, is still alive
    assert live_workers(before) == []
    assert len(seen) == 4  # batches 0..3 come before the one holding sample 9


@pytest.mark.timeout(120)
def test_workers_end_when_the_loop_body_fails_or_breaks():
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(RuntimeError) as held:
        with loader_batches(BrokenAt(-1), **WORKERS) as batches:
            for batch in batches:
                assert live_workers(before), "the loader runs two workers while it is read"
                raise RuntimeError("the step failed")
    assert held.value.__traceback__ is not None
    assert live_workers(before) == []
    with loader_batches(BrokenAt(-1), **WORKERS) as batches:
        first = next(batches)
    assert first.numel() == 2  # left after one batch: the workers end all the same
    assert live_workers(before) == []


def test_batches_are_those_of_the_plain_loop():
    with loader_batches(BrokenAt(-1), **WORKERS) as batches:
        through_with = [b.clone() for b in batches]
    assert [b.tolist() for b in through_with] == [b.tolist() for b in make_loader(BrokenAt(-1), **WORKERS)]
    assert sorted(v for b in through_with for v in b.tolist()) == [float(i) for i in range(32)]
