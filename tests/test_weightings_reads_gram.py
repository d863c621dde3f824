"""Device reads of the Gram-based weightings on the paths their default settings do not
take (tests/test_weightings_reads.py runs every method with its defaults), and the one
transfer they share (``_common.host_gram``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.weightings._common import gram, host_gram

sys.path.insert(0, str(Path(__file__).parent))
import test_weightings_reads as reads  # noqa: E402


@pytest.mark.parametrize("name,params,expected", [
    ("mgda", {"normalization": "loss+"}, 1),  # the losses travel with the Gram matrix
    ("mgda_ub", {"normalization": "loss"}, 1),
    ("imtl", {"mode": "loss"}, 0),  # IMTL-L alone: loss-level, its weights stay on the device
    ("nash_mtl", {"update_weights_every": 2}, 0.5),  # solves (and reads) on every other step
])
def test_options_read_what_they_should(monkeypatch, name, params, expected):
    monkeypatch.setitem(reads.PARAMS, name, params)
    counts, steps, _ = reads.step_reads(monkeypatch, name)
    own = {k: n for k, n in counts.items() if not k.split()[1].startswith(reads.PRESENCE)}
    assert steps == reads.STEPS
    assert sum(own.values()) == expected * steps, f"{name} {params}: {own}"
    built = get_registry().get("weighting", name).build(params, task_names=["a", "b"])
    assert built.host_reads_per_step == int(np.ceil(expected))  # what the instance declares


def test_host_gram_packs_the_extra_values_into_the_one_read():
    g = torch.randn(3, 1001, generator=torch.Generator().manual_seed(5))  # float32 rows
    extra = torch.tensor([0.1, 2.5e-8, 3.0e7], dtype=torch.float32)
    m, values = host_gram(g, extra)
    assert isinstance(m, np.ndarray) and m.dtype == np.float64 and m.shape == (3, 3)
    assert np.array_equal(m, gram(g).numpy())  # the same float64 Gram matrix
    assert np.array_equal(values, extra.double().numpy())  # float32 values exactly
    m2, none = host_gram(g)
    assert np.array_equal(m2, m) and none.shape == (0,)


def test_mgda_loss_normalisation_uses_the_packed_losses():
    # normalised by the losses (2, 8): g / L = (1, 0), (0, 1/4); min-norm point of the
    # normalised pair: a = (1/17, 16/17); the update a @ g = (2/17, 32/17)
    g = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    w = get_registry().get("weighting", "mgda").build({"normalization": "loss"}, task_names=["a", "b"])
    d = w.combine_grads(g, {"a": torch.tensor(2.0), "b": torch.tensor(8.0)})
    assert torch.allclose(d, torch.tensor([2 / 17, 32 / 17], dtype=torch.float64), rtol=1e-12)
    assert w.weights() == pytest.approx({"a": 1 / 17, "b": 16 / 17}, rel=1e-12)
    assert all(type(v) is float for v in w.weights().values())
