"""Test setup: no third-party entry points; a fresh plugin manager per test that asks."""

from __future__ import annotations

import multiprocessing
import os

os.environ.setdefault("MTLKIT_LOAD_ENTRY_POINTS", "0")
# One intra-op thread: the tests' tensors are tiny, and OpenMP threads that spin-wait for
# each other are slowed a hundredfold whenever another process holds a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from mtlkit import plugin_manager  # noqa: E402


@pytest.fixture
def fresh_pm():
    """A fresh plugin manager, restored afterwards, so registered test plugins don't leak."""
    saved = plugin_manager._MANAGER
    pm = plugin_manager.reset_plugin_manager(load_entry_points=False)
    yield pm
    plugin_manager._MANAGER = saved


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _no_child_process_outlives_its_test():
    """A multiprocessing child (a DataLoader worker) still running after its test fails that
    test, and is killed: left running it costs the rest of the suite a core, and one that does
    not die of SIGTERM hangs the suite's exit for good (multiprocessing terminates its children
    there, then joins them), after every test has passed."""
    before = {p.pid for p in multiprocessing.active_children()}
    yield
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    for p in left:
        p.join(5)  # one on its way out (terminated, not yet reaped) is not a leak
    left = [p for p in left if p.is_alive()]
    if not left:
        return
    message = (f"the test left {len(left)} child process(es) running: "
               + ", ".join(f"{p.name} (pid {p.pid})" for p in left))
    try:
        for p in left:
            p.kill()
            p.join(5)
    except RuntimeError:  # DataLoader's SIGCHLD handler: "worker ... killed by signal", expected here
        pass
    pytest.fail(message, pytrace=False)
