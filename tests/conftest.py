"""Test setup: no third-party entry points; a fresh plugin manager per test that asks."""

from __future__ import annotations

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
