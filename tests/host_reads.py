"""Counting reads of tensor values made by mtlkit's own code (no tests here).

Every way a tensor's value reaches Python (``item``, ``tolist``, ``float()``, ``int()``,
``bool()``, ``numpy()``, ``cpu()``...) waits, on an accelerator, for the device to finish
its queued work. On the CPU such a read costs nothing, so counting the calls made from
mtlkit's code (engine, model, tasks, weightings; torch's internals are not ours to count)
during a CPU run gives exactly what a GPU run would pay for. A method that has moved its
values to the host once (``.cpu()``, then numpy) reads nothing more: numpy arithmetic is
not counted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import torch

import mtlkit

READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")
OURS = os.path.realpath(Path(mtlkit.__file__).parent.parent)  # mtlkit/ and plugins/
TESTS = os.path.realpath(Path(__file__).parent)


def count_reads(monkeypatch) -> Counter:
    """Patch every read of a tensor's value; count those called from mtlkit's code, keyed
    ``"<read> <file relative to the repo>:<line>"``. ``monkeypatch.undo()`` stops counting."""
    counts: Counter = Counter()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            frame = sys._getframe(1)
            caller = os.path.realpath(frame.f_code.co_filename)
            if caller.startswith(OURS + os.sep) and not caller.startswith(TESTS + os.sep):
                counts[f"{_name} {os.path.relpath(caller, OURS)}:{frame.f_lineno}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


def _has_list(index) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def count_list_indices(monkeypatch) -> Counter:
    """Patch tensor indexing; count, as count_reads does, each index (or assignment through
    one) by a Python list made from mtlkit's code: torch copies the list to the tensor's
    device with a blocking copy, which on an accelerator waits for every queued kernel (a
    device index from ``step_context.to_device`` does not)."""
    counts: Counter = Counter()
    for name in ("__getitem__", "__setitem__"):
        real = getattr(torch.Tensor, name)

        def index(self, key, *args, _real=real, _name=name):
            if _has_list(key):
                frame = sys._getframe(1)
                caller = os.path.realpath(frame.f_code.co_filename)
                if caller.startswith(OURS + os.sep) and not caller.startswith(TESTS + os.sep):
                    counts[f"{_name} {os.path.relpath(caller, OURS)}:{frame.f_lineno}"] += 1
            return _real(self, key, *args)

        monkeypatch.setattr(torch.Tensor, name, index)
    return counts


def by_file(counts: Counter) -> Counter:
    """The counts summed per file name."""
    out: Counter = Counter()
    for key, n in counts.items():
        out[Path(key.split()[1].split(":")[0]).name] += n
    return out


@contextlib.contextmanager
def no_device_sync():
    """CUDA only: inside, torch's sync debug mode is "error", so any call that makes the
    host wait for the device (a value read, nonzero / boolean indexing, a blocking copy)
    raises. The queue is drained first, so earlier work does not count."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
