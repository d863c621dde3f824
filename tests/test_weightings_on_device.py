"""Decisions the loss-level and own-step weightings now take on the device, without reading
a value back (see tests/test_weightings_reads.py): they must keep what the host-side code
did, rounding included where it can."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtlkit.engine.distributed import DistContext
from mtlkit.plugins.weightings._common import adam_step
from mtlkit.plugins.weightings.rlw import scalar_times

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import count_reads  # noqa: E402
from test_weightings_step import Quadratic, adam, build, quad_losses  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rlw_tensor_weight_times_a_loss_rounds_as_a_python_float(dtype):
    """RLW used float(w_k) * L_k; the weight now stays a float64 tensor: the product and the
    loss's gradient are the same bits in every loss dtype."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        w = torch.softmax(torch.randn(2, generator=gen, dtype=torch.float64), 0)[0]
        value = float(torch.rand((), generator=gen) * 10)
        a = torch.tensor(value, dtype=dtype, requires_grad=True)
        b = torch.tensor(value, dtype=dtype, requires_grad=True)
        mine, ref = scalar_times(w, a), float(w) * b
        assert mine.dtype == ref.dtype == dtype and torch.equal(mine, ref)
        mine.backward()
        ref.backward()
        assert torch.equal(a.grad, b.grad)


def test_rlw_weights_are_tensors_on_the_losses_device_and_sum_to_one():
    w = build("rlw", {"seed": 1}, "abc")
    w.combine({t: torch.tensor(1.0) for t in "abc"})
    got = w.weights()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in got.values())
    assert sum(float(v) for v in got.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("counts", [[1, 1, 1], [3, 1, 7]])
def test_adam_step_with_counts_on_the_device_is_adam(counts):
    """Per-entry step counts as a tensor (Auto-Lambda keeps them on the device): each entry
    takes Adam's step for its own count; equal counts give the int count's result."""
    rng = np.random.default_rng(0)
    x0, g = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    m0, v0 = rng.normal(size=3).astype(np.float32) * 0.1, rng.random(3).astype(np.float32) * 0.1
    x, m, v = (torch.from_numpy(a.copy()) for a in (x0, m0, v0))
    adam_step(x, torch.from_numpy(g), m, v, torch.tensor(counts), 0.05)
    for k, t in enumerate(counts):
        xe, _, _ = adam(x0[k].astype(np.float64), g[k], m0[k], v0[k], t, 0.05)
        assert x[k].item() == pytest.approx(xe, rel=1e-5)
    if len(set(counts)) == 1:
        xi, mi, vi = (torch.from_numpy(a.copy()) for a in (x0, m0, v0))
        adam_step(xi, torch.from_numpy(g), mi, vi, counts[0], 0.05)
        assert torch.allclose(x, xi, rtol=1e-6, atol=0) and torch.equal(m, mi) and torch.equal(v, vi)


def quad_ctx(model, train, val):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return SimpleNamespace(raw_model=model, optimizer=opt, losses=quad_losses(model, train), batch=train,
                           dist=DistContext(), draw_batch=lambda split: val,
                           losses_on=lambda batch: quad_losses(model, batch),
                           backward_loss=lambda loss: loss.backward(), present_tasks=lambda **kw: ["a", "b"])


@pytest.mark.parametrize("val_target", [0.0, float("nan")], ids=["d=0", "d=nan"])
def test_auto_lambda_takes_no_meta_step_without_a_direction(monkeypatch, val_target):
    """A validation batch whose loss has no gradient (d = 0) or a NaN one: lambda, Adam's
    moments and the step counts stay as they were, the model still trains on sum lambda_k
    L_k, and nothing is read back; the next real step is Adam's first (a move of lr)."""
    rng = np.random.default_rng(2)
    train = {t: (torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32),
                 torch.tensor(rng.normal(size=2), dtype=torch.float32)) for t in "ab"}
    flat = {t: (torch.zeros(2, 3), torch.full((2,), val_target)) for t in "ab"}  # L_val = const
    model = Quadratic()
    w = build("auto_lambda", {"lr": 0.05})
    before = {n: b.clone() for n, b in w.named_buffers()}
    ctx = quad_ctx(model, train, flat)
    assert torch.isnan(w.meta_gradient(ctx)).all()
    model.theta.grad = None
    reads = count_reads(monkeypatch)
    w.backward(ctx)
    monkeypatch.undo()
    assert sum(reads.values()) == 0, dict(reads)
    for n, b in w.named_buffers():
        assert torch.equal(b, before[n]), n
    assert w.get_state() == {"updates": [0, 0]}
    gk = [a.T @ (a @ model.theta.detach() - y) for a, y in train.values()]
    assert torch.allclose(model.theta.grad, 0.1 * gk[0] + 0.1 * gk[1], rtol=1e-5)
    assert torch.isfinite(model.theta).all()
    # a validation batch with a direction: the first Adam step moves each lambda by lr
    val = {t: (torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32),
               torch.tensor(rng.normal(size=2), dtype=torch.float32)) for t in "ab"}
    w.backward(quad_ctx(model, train, val))
    assert torch.allclose((w.lambdas - 0.1).abs(), torch.full((2,), 0.05), atol=1e-5)
    assert w.get_state() == {"updates": [1, 1]}


def test_auto_lambda_step_counts_load_from_old_and_new_state():
    w = build("auto_lambda", tasks="abc")
    w.set_state({"updates": 4})  # an older checkpoint: one count for every task
    assert w.get_state() == {"updates": [4, 4, 4]}
    w.set_state({"updates": [1, 0, 2]})
    assert w.get_state() == {"updates": [1, 0, 2]} and w.updates.dtype == torch.long
    assert "updates" not in w.state_dict()  # the JSON state carries it, as before
