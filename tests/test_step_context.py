"""The step as the weighting's contract (mtlkit.step_context): the default backward keeps
every registered method's update (checked against a straightforward independent
implementation of the per-task-gradient step), the ``features`` target computes what its
definition says, and a weighting that owns its backward gets the context's pieces
(extra batches that repeat, ``on_step_end`` after the update)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from mtlkit.contracts import Weighting, split_parameters
from mtlkit.engine import Trainer
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.distributed import DistContext
from mtlkit.engine.step import TrainStep
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.attention.mtan import MTANNetwork, MTANParams
from mtlkit.plugins.attention.single import SingleParams, SingleTaskNetworks
from mtlkit.plugins.backbones.small_cnn import SmallCNN, SmallCNNParams

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import MeanGrad, make_data, make_model, make_tasks  # noqa: E402

TASKS = ("shape", "colour", "size")
LR = 0.2


def batches(n=3, size=6):
    data, _ = make_data(num_train=n * size, num_val=2)
    items = [data[i] for i in range(n * size)]
    return [torch.utils.data.default_collate(items[k * size:(k + 1) * size]) for k in range(n)]


def build_weighting(name, params, tasks):
    return get_registry().get("weighting", name).build(params, task_names=list(tasks))


def flat_grads(loss, params, **kw):
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def reference_step(model, tasks, weighting, batch, target="params"):
    """The update written out plainly: per-task gradients (of the shared parameters, or of
    the Split trunk's output), combine_grads, the rest by combine(losses); SGD."""
    x = batch["image"]
    wparams = [p for p in weighting.parameters() if p.requires_grad]
    if target == "features":
        rep = model.backbone(x)
        out = {t: model.heads[t](rep) for t in tasks}
    else:
        out = model(x)
    losses = {t: tasks[t].loss(out[t], batch[tasks[t].target]) for t in tasks}
    updates = {}
    if weighting.requires_grads is None:
        params = list(model.parameters()) + wparams
        updates = dict(zip(map(id, params), flat_grads(weighting.combine(losses), params)))
    else:
        shared, _ = split_parameters(model)
        trunk = list(model.backbone.parameters()) if target == "features" else shared
        rows_of = [rep] if target == "features" else shared
        G = torch.stack([torch.cat([g.reshape(-1) for g in flat_grads(losses[t], rows_of, retain_graph=True)])
                         for t in tasks])
        combined = weighting.combine_grads(G, {t: v.detach() for t, v in losses.items()})
        if target == "features":
            trunk_grads = flat_grads(rep, trunk, grad_outputs=combined.view_as(rep), retain_graph=True)
        else:
            trunk_grads = [g.view_as(p) for g, p in zip(combined.split([p.numel() for p in trunk]), trunk)]
        updates.update(zip(map(id, trunk), trunk_grads))
        rest = [p for p in list(model.parameters()) + wparams if id(p) not in updates]
        updates.update(zip(map(id, rest), flat_grads(weighting.combine(losses), rest)))
    with torch.no_grad():
        for p in list(model.parameters()) + wparams:
            p -= LR * updates[id(p)]


def engine_steps(model, tasks, weighting, data):
    params = list(model.parameters()) + list(weighting.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    step = TrainStep(model, model, tasks, weighting, opt, TrainingConfig(device="cpu"), DistContext())
    for i, b in enumerate(data):
        step(b, None, 0, i)


def assert_device_solver_follows_exact(name: str, params: dict) -> None:
    """Weighting ``name`` (with ``params``) trained through the engine for a few steps with
    ``solver = "device"`` ends where the exact host solver does: the same weights (1e-5) and
    the same task weights (1e-6), after steps that moved the model."""
    tasks = make_tasks(TASKS)
    data = batches()
    runs = []
    for solver in ("exact", "device"):
        model = make_model(tasks, seed=1)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        w = get_registry().get("weighting", name).build({**params, "solver": solver}, task_names=list(tasks))
        engine_steps(model, tasks, w, data)
        runs.append((model, w))
    (exact, w0), (device, w1) = runs
    assert max(float((p.detach() - start[k]).abs().max()) for k, p in exact.named_parameters()) > 1e-3
    for (k, a), b in zip(exact.named_parameters(), device.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (name, k, float((a - b).abs().max()))
    assert w1.weights().keys() == w0.weights().keys()
    assert [float(v) for v in w1.weights().values()] == pytest.approx(list(w0.weights().values()), rel=1e-6)


def methods():
    """Every registered weighting that keeps the default step (its own backward or
    on_step_end is tested by its own defining property)."""
    comps = get_registry().components["weighting"]
    return sorted(n for n, c in comps.items()
                  if getattr(c.factory, "backward", Weighting.backward) is Weighting.backward
                  and getattr(c.factory, "on_step_end", Weighting.on_step_end) is Weighting.on_step_end)


@pytest.mark.parametrize("name", methods())
def test_default_backward_keeps_every_method_update(name):
    assert len(methods()) >= 11
    tasks = make_tasks(TASKS)
    data = batches()
    factory = get_registry().get("weighting", name).factory
    targets = list(getattr(factory, "grad_targets", ("params",))) if factory.requires_grads else ["params"]
    for target in targets:
        params = {} if target == getattr(factory, "grad_target", "params") else {"grad_target": target}
        mine, ref = make_model(tasks, seed=1), make_model(tasks, seed=1)
        w_mine, w_ref = build_weighting(name, params, tasks), build_weighting(name, params, tasks)
        start = {k: v.detach().clone() for k, v in ref.named_parameters()}
        engine_steps(mine, tasks, w_mine, data)
        for b in data:
            reference_step(ref, tasks, w_ref, b, target)
        moved = max(float((p.detach() - start[k]).abs().max()) for k, p in ref.named_parameters())
        assert moved > 1e-3, (name, target)
        for (k, a), b in zip(mine.named_parameters(), ref.parameters()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, target, k, float((a - b).abs().max()))


def tiny_mtan(tasks, seed=0):
    torch.manual_seed(seed)
    return MTANNetwork(MTANParams(), backbone=lambda: SmallCNN(SmallCNNParams(widths=[4, 8])),
                       heads={t: (lambda c, _t=t: get_registry().get("head", "classifier").build(
                           {}, in_channels=c, task=tasks[_t])) for t in tasks}, tasks=tasks)


def test_features_on_mtan_back_propagates_the_combined_tap_gradient_once():
    """MeanGrad on the taps: the backbone gets the gradient of the mean loss (the mean of the
    tap gradients, back through the trunk); everything after the taps (attention, the
    shared f convs, heads) gets the gradient of combine = the sum of the losses."""
    tasks = make_tasks(TASKS)
    batch = batches(1)[0]
    model = tiny_mtan(tasks)
    ref = copy.deepcopy(model)
    w = MeanGrad(list(tasks))
    w.grad_target, w.grad_targets = "features", ("params", "features")
    engine_steps(model, tasks, w, [batch])
    out = ref(batch["image"])
    losses = [tasks[t].loss(out[t], batch[tasks[t].target]) for t in tasks]
    trunk = list(ref.backbone.parameters())
    rest = [p for p in ref.parameters() if all(p is not q for q in trunk)]
    want = flat_grads(sum(losses) / len(losses), trunk, retain_graph=True) + flat_grads(sum(losses), rest)
    after = dict(model.named_parameters())
    names = {id(p): k for k, p in ref.named_parameters()}
    for p, g in zip(trunk + rest, want):
        k = names[id(p)]
        assert torch.allclose(after[k], p.detach() - LR * g, rtol=1e-4, atol=1e-6), k
    assert any(float(g.abs().max()) > 0 for g in want[:len(trunk)])


def test_features_refused_where_the_network_exposes_no_representation():
    tasks = make_tasks(TASKS)
    single = SingleTaskNetworks(SingleParams(), backbone=lambda: SmallCNN(SmallCNNParams(widths=[4])),
                                heads={t: (lambda c, _t=t: get_registry().get("head", "classifier").build(
                                    {}, in_channels=c, task=tasks[_t])) for t in tasks}, tasks=tasks)
    train, _ = make_data(num_train=8)
    w = build_weighting("mgda", {"grad_target": "features"}, tasks)
    with pytest.raises(ConfigError, match=r"^weighting: grad_target = \"features\" needs a network .*SingleTaskNetworks"):
        Trainer(single, tasks, train, weighting=w, training=dict(device="cpu"), quiet=True)
    # a loss-level method has no gradient target to set; a gradient method only its own
    with pytest.raises(ConfigError, match=r"weighting.*grad_target"):
        build_weighting("equal", {"grad_target": "features"}, tasks)
    with pytest.raises(ConfigError, match=r"weighting.*grad_target"):
        build_weighting("mgda", {"grad_target": "activations"}, tasks)
    custom = MeanGrad(list(tasks))
    custom.grad_target = "features"
    with pytest.raises(ConfigError, match=r"^weighting: 'MeanGrad' does not support grad_target = \"features\""):
        Trainer(make_model(tasks), tasks, train, weighting=custom, training=dict(device="cpu"), quiet=True)


class Peeking(Weighting):
    """Owns its backward: draws a validation batch, reads its loss, then the plain sum."""

    def __init__(self, names, look=False):
        super().__init__(names)
        self.drawn, self.after, self.look, self.seen = [], [], look, []

    def backward(self, ctx):
        extra = ctx.draw_batch("val")
        if self.look:
            with torch.no_grad():
                self.seen.append(ctx.losses_on(extra))
        self.drawn.append((ctx.epoch, ctx.step, extra["image"].clone()))
        self.before = [p.detach().clone() for p in ctx.shared_params]
        ctx.backward_loss(sum(ctx.losses.values()))

    def on_step_end(self, ctx):
        self.after.append(any(not torch.equal(a, p) for a, p in zip(self.before, ctx.shared_params)))


def test_a_weighting_owning_its_backward_draws_repeatable_batches_and_sees_the_update():
    tasks = make_tasks(TASKS)
    train, val = make_data(num_train=12, num_val=9)

    def run(weighting):
        model = make_model(tasks, seed=0, dropout=0.5)  # dropout: the draw must not shift its RNG
        Trainer(model, tasks, train, val_data=val, weighting=weighting, optimizer=dict(name="sgd", lr=0.1),
                training=dict(epochs=2, batch_size=4, seed=5, device="cpu"), quiet=True).fit()
        return dict(model.named_parameters())

    a, b = Peeking(list(tasks)), Peeking(list(tasks))
    pa, pb, plain = run(a), run(b), run(Weighting(list(tasks)))
    looking = Peeking(list(tasks), look=True)
    run(looking)
    assert len(looking.seen) == 6 and all(set(s) == set(tasks) and all(torch.isfinite(v) for v in s.values())
                                          for s in looking.seen)
    assert [(e, s) for e, s, _ in a.drawn] == [(e, s) for e in (0, 1) for s in range(3 * e, 3 * e + 3)]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a.drawn, b.drawn))
    assert not torch.equal(a.drawn[0][2], a.drawn[1][2])
    assert all(a.after) and len(a.after) == 6
    # drawing leaves training as it was: the dropout RNG stream included
    for k in plain:
        assert torch.equal(pa[k], pb[k]) and torch.equal(pa[k], plain[k]), k


@pytest.mark.parametrize("target", ["params", "features"])
def test_batched_per_task_passes_give_the_same_update(target, monkeypatch):
    """The K passes as one ``is_grads_batched`` pass (an option: slower on CPU, see
    docs/performance.md) take the same step."""
    from mtlkit.engine import grad_step

    tasks = make_tasks(TASKS)
    data = batches(2)
    models = []
    for batched in (False, True):
        monkeypatch.setattr(grad_step, "BATCHED", batched)
        model = make_model(tasks, seed=4)
        engine_steps(model, tasks, build_weighting("pcgrad", {"grad_target": target, "reduction": "mean"}, tasks),
                     data)
        models.append(dict(model.named_parameters()))
    for k, p in models[0].items():
        assert torch.allclose(p, models[1][k], rtol=1e-4, atol=1e-6), k


def test_which_tasks_take_part_is_copied_before_the_backward_passes_and_read_after(monkeypatch):
    """The presence flags start on their way to the host before any backward pass is
    queued, and are read only once the passes are queued: the host never waits for them."""
    from mtlkit.engine import grad_step
    from mtlkit.engine.early_read import EarlyRead

    events = []
    real_init, real_result = EarlyRead.__init__, EarlyRead.result
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def init(self, values):
        events.append(("start", values.tolist()))
        real_init(self, values)

    def result(self):
        events.append(("read", None))
        return real_result(self)

    monkeypatch.setattr(EarlyRead, "__init__", init)
    monkeypatch.setattr(EarlyRead, "result", result)
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: events.append(("pass", None)) or real_grad(*a, **k))
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: events.append(("pass", None)) or real_backward(*a, **k))
    tasks = make_tasks(TASKS)
    model = make_model(tasks)
    batch = batches(1)[0]
    tasks["colour"].loss = lambda prediction, target: prediction.sum() * 0.0  # no valid target: 0, no gradient
    weighting = MeanGrad(list(tasks))
    step = TrainStep(model, model, tasks, weighting, torch.optim.SGD(model.parameters(), lr=LR),
                     TrainingConfig(device="cpu"), DistContext())
    step(batch, None, 0, 0)
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and events[0][1] == [True, False, True], events
    first_read = kinds.index("read")
    assert kinds.count("pass") >= len(TASKS) and kinds[1:first_read].count("pass") >= len(TASKS), kinds
    assert step.present == ["shape", "size"] and weighting.calls == 1
    assert grad_step.present_tasks(step, type("C", (), {"task_names": ["a", "b"], "global_losses": lambda self: {}})(),
                                   losses={"a": torch.tensor(float("nan")), "b": torch.tensor(0.0)}) == ["a"]
