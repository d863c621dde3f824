"""Weightings that own the step (FAMO, GradNorm, GradDrop, MGDA-UB, Auto-Lambda): their
update rules by hand (numpy) on toys, and through the engine against the step written out."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtlkit.engine.distributed import DistContext
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_model, make_tasks  # noqa: E402
from test_step_context import LR, TASKS, batches, engine_steps  # noqa: E402


def build(name, params=None, tasks=("a", "b")):
    return get_registry().get("weighting", name).build(params or {}, task_names=list(tasks))


def adam(x, g, m, v, t, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    g = g + wd * x
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), m, v


def losses_of(model, tasks, batch):
    out = model(batch["image"])
    return {t: tasks[t].loss(out[t], batch[tasks[t].target]) for t in tasks}


# -- FAMO -------------------------------------------------------------------------------

def test_famo_logit_update_rule_on_two_tasks():
    w = build("famo", {"w_lr": 0.1, "gamma": 0.01})
    xi, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    history = [((2.0, 0.5), (1.5, 0.45)), ((1.5, 0.45), (1.4, 0.3)), ((1.4, 0.3), (1.35, 0.29))]
    for t, (before, after) in enumerate(history, start=1):
        z = np.exp(xi) / np.exp(xi).sum()
        delta = np.log(np.array(before) + 1e-8) - np.log(np.array(after) + 1e-8)
        grad = z * delta - z * (z @ delta)  # J_softmax^T delta
        xi, m, v = adam(xi, grad, m, v, t, 0.1, wd=0.01)
        w.update(torch.tensor(before), torch.tensor(after))
        assert np.allclose(w.logits.numpy(), xi, atol=1e-6)
        if t == 1:  # task a's log loss fell more: the weight moves to b
            assert w.weights()["a"] < 0.5 < w.weights()["b"]


def test_famo_step_weights_are_the_gradient_of_the_normalised_log_losses():
    w = build("famo", tasks="abc")
    with torch.no_grad():
        w.logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    values = torch.tensor([2.0, 0.5, 1.2], dtype=torch.float64)
    leaves = values.clone().requires_grad_()
    z = torch.softmax(w.logits.double(), 0)
    c = (z / values).sum()
    (expected,) = torch.autograd.grad((z * torch.log(leaves)).sum() / c, leaves)
    got = w.loss_weights({t: values[k] for k, t in enumerate("abc")}).double()
    assert torch.allclose(got, expected, rtol=1e-6)


def test_famo_on_step_end_sees_the_losses_after_the_update():
    tasks, data = make_tasks(TASKS), batches()
    mine, ref = make_model(tasks, seed=1), make_model(tasks, seed=1)
    w_mine, w_ref = build("famo", tasks=TASKS), build("famo", tasks=TASKS)
    engine_steps(mine, tasks, w_mine, data)
    for b in data:  # the step written out: weighted loss, SGD, losses again, logits' step
        losses = losses_of(ref, tasks, b)
        before = torch.stack([losses[t].detach() for t in TASKS])
        weights = w_ref.loss_weights({t: losses[t].detach() for t in TASKS})
        grads = torch.autograd.grad(sum(weights[k] * losses[t] for k, t in enumerate(TASKS)), list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= LR * g
            after = torch.stack([v.detach() for v in losses_of(ref, tasks, b).values()])
        w_ref.update(before, after)
    assert torch.allclose(w_mine.logits, w_ref.logits, atol=1e-6) and w_mine.logits.abs().max() > 0
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# -- GradNorm ---------------------------------------------------------------------------

def test_gradnorm_weight_update_by_hand():
    w = build("gradnorm", {"alpha": 1.5, "lr": 0.1}, "abc")
    wt, m, v, init = np.ones(3), np.zeros(3), np.zeros(3), None
    steps = [([1.0, 2.0, 4.0], [2.0, 1.0, 0.5]), ([1.5, 1.0, 3.0], [1.0, 0.9, 0.45])]
    for t, (norms, losses) in enumerate(steps, start=1):
        norms, losses = np.array(norms), np.array(losses)
        init = losses if init is None else init
        ratio = losses / init
        r = ratio / ratio.mean()
        g = wt * norms
        grad = np.sign(g - g.mean() * r**1.5) * norms
        wt, m, v = adam(wt, grad, m, v, t, 0.1)
        wt = 3 * wt / wt.sum()
        w.update(torch.tensor(norms, dtype=torch.float32), torch.tensor(losses, dtype=torch.float32))
        assert np.allclose(w.task_weights.numpy(), wt, atol=1e-5)


def test_gradnorm_balances_gradient_norms_to_the_training_rates():
    w = build("gradnorm", {"alpha": 1.0, "lr": 0.002}, "abc")
    norms = torch.tensor([1.0, 3.0, 0.5])
    w.update(norms, torch.tensor([1.0, 1.0, 1.0]))  # L(0)
    losses = torch.tensor([0.8, 0.4, 0.6])  # task a trains slowest
    for _ in range(3000):
        w.update(norms, losses)
    g = w.task_weights * norms
    r = (losses / losses.mean())
    assert torch.allclose(g / g.mean(), r, rtol=0.03)  # G_k proportional to r_k^alpha
    assert float(w.task_weights.sum()) == pytest.approx(3.0)


@pytest.mark.parametrize("target", ["params", "features"])
def test_gradnorm_trains_the_model_on_the_weighted_losses(target):
    tasks, data = make_tasks(TASKS), batches(n=1)
    mine, ref = make_model(tasks, seed=1), make_model(tasks, seed=1)
    w = build("gradnorm", {"grad_target": target, "lr": 0.1}, TASKS)
    before = w.task_weights.clone()
    engine_steps(mine, tasks, w, data)
    losses = losses_of(ref, tasks, data[0])
    grads = torch.autograd.grad(sum(before[k] * losses[t] for k, t in enumerate(TASKS)), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= LR * g
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(w.task_weights, before) and float(w.task_weights.sum()) == pytest.approx(3.0)


# -- GradDrop ---------------------------------------------------------------------------

def test_graddrop_sign_dropout_by_hand():
    from mtlkit.plugins.weightings.graddrop import sign_dropout

    rng = np.random.default_rng(0)
    b, e = 2, 3
    grads = rng.normal(size=(2, b * e))
    act = rng.normal(size=(b, e))
    u = np.array([0.2, 0.5, 0.9])
    s = (grads.reshape(2, b, e) * np.sign(act)).sum(1)  # K x E
    p = 0.5 * (1 + s.sum(0) / (np.abs(s).sum(0) + 1e-7))
    keep_pos, keep_neg = np.tile(p > u, b), np.tile(p < u, b)
    mask = (grads > 0) & keep_pos | (grads < 0) & keep_neg
    for leak in (0.0, 0.3):
        expected = ((leak + (1 - leak) * mask) * grads).sum(0)
        got = sign_dropout(torch.from_numpy(grads), torch.from_numpy(np.sign(act).reshape(-1)), [b], [b * e],
                           torch.from_numpy(u), leak)
        assert np.allclose(got.numpy(), expected)
    full = sign_dropout(torch.from_numpy(grads), torch.ones(b * e, dtype=torch.float64), [b], [b * e],
                        torch.from_numpy(u), 1.0)
    assert np.allclose(full.numpy(), grads.sum(0))  # leak 1: nothing is dropped


def test_graddrop_keeps_gradients_that_agree_in_sign():
    from mtlkit.plugins.weightings.graddrop import sign_dropout

    g = torch.rand(3, 8, dtype=torch.float64) + 0.1  # every component positive, A positive: P = 1
    out = sign_dropout(g, torch.ones(8, dtype=torch.float64), [2], [8], torch.rand(4, dtype=torch.float64), 0.0)
    assert torch.allclose(out, g.sum(0))
    out = sign_dropout(-g, torch.ones(8, dtype=torch.float64), [2], [8], torch.rand(4, dtype=torch.float64), 0.0)
    assert torch.allclose(out, -g.sum(0))


def test_graddrop_and_mgda_ub_work_on_features_only():
    for name in ("graddrop", "mgda_ub"):
        comp = get_registry().get("weighting", name)
        assert comp.factory.grad_targets == ("features",)
    with pytest.raises(ConfigError, match="weighting"):
        build("mgda_ub", {"grad_target": "params"})
    assert build("mgda_ub").grad_target == "features" and build("graddrop").grad_target == "features"


# -- Auto-Lambda ------------------------------------------------------------------------

class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))


def quad_losses(model, batch):
    """L_k = 1/2 |A_k theta - y_k|^2 for the batch's (A_k, y_k)."""
    return {t: 0.5 * ((a @ model.theta - y) ** 2).sum() for t, (a, y) in batch.items()}


def test_auto_lambda_hypergradient_on_quadratic_losses():
    rng = np.random.default_rng(1)
    mk = lambda: {t: (torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32),  # noqa: E731
                      torch.tensor(rng.normal(size=2), dtype=torch.float32)) for t in "ab"}
    train, val = mk(), mk()
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    w = build("auto_lambda", {"lr": 0.05})
    drawn = []
    theta = model.theta.detach().clone()
    losses = quad_losses(model, train)
    ctx = SimpleNamespace(raw_model=model, optimizer=opt, losses=losses, batch=train, dist=DistContext(),
                          draw_batch=lambda split: drawn.append(split) or val, losses_on=lambda batch: quad_losses(model, batch),
                          backward_loss=lambda loss: loss.backward(), present_tasks=lambda **kw: ["a", "b"])
    grad = w.meta_gradient(ctx)
    # closed form: theta' = theta - a (g + wd theta); dL_val(theta')/dlambda_k = -a grad L_k(theta) . grad L_val(theta')
    gk = {t: a.T @ (a @ theta - y) for t, (a, y) in train.items()}
    g = 0.1 * gk["a"] + 0.1 * gk["b"]
    prime = theta - 0.1 * (g + 0.01 * theta)
    d = sum(a.T @ (a @ prime - y) for a, y in val.values())
    expected = torch.stack([-0.1 * gk[t] @ d for t in "ab"])
    assert torch.allclose(grad.float(), expected, rtol=1e-3, atol=1e-6)
    assert torch.equal(model.theta.detach(), theta)  # the parameters are back
    # by default the meta batch is another training batch (the authors' dense-prediction code),
    # never the split the trainer evaluates on
    assert drawn == ["train"]
    # the step: one Adam step on lambda, then the model's gradient of sum lambda_k L_k
    w.backward(ctx)
    lam = w.lambdas.clone()
    assert torch.allclose(lam, 0.1 - 0.05 * torch.sign(expected), atol=1e-4)
    assert torch.allclose(model.theta.grad, lam[0] * gk["a"] + lam[1] * gk["b"], rtol=1e-5)
    with pytest.raises(ConfigError, match="weighting 'auto_lambda'"):
        build("auto_lambda", {"primary": ["z"]})
