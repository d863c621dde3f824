"""The trainer: settings, data order, weighting protocol, evaluation, files, progress."""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mtlkit.contracts import Weighting
from mtlkit.engine import Trainer
from mtlkit.engine.checkpoint import load_checkpoint
from mtlkit.engine.progress import ProgressReporter
from mtlkit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import MeanGrad, Uncertainty, make_data, make_model, make_tasks, state_equal  # noqa: E402


def trainer(tasks=None, train=None, val=None, **kw):
    tasks = tasks or make_tasks()
    if train is None:
        train, val = make_data(num_train=12)
    kw.setdefault("quiet", True)
    return Trainer(make_model(tasks), tasks, train, val, **kw)


# -- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw, pattern", [
    (dict(training={"epoch": 3}), r"\[training\] epoch: unknown field, did you mean 'epochs'"),
    (dict(optimizer={"name": "rmsprop"}), r"\[optimizer\] name"),
    (dict(optimizer={"name": "adam", "nesterov": True}), r"\[optimizer\].*sgd"),
    (dict(schedule={"name": "step", "step_size": 0}), r"\[schedule\] step_size"),
    (dict(training={"best_metric": "shape/iou"}), r"training.best_metric: task 'shape' has no metric 'iou'"),
    (dict(training={"best_metric": "depth/loss"}), r"training.best_metric: unknown task 'depth'"),
    (dict(training={"domain_batch_size": {"shape": 2}}), r"training.domain_batch_size applies to many-to-many"),
])
def test_bad_settings_name_the_field(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        trainer(**kw)


def test_gradient_weighting_refused_for_many_to_many():
    tasks = make_tasks()
    a, _ = make_data(num_train=6)
    with pytest.raises(ConfigError, match=r"^weighting: 'MeanGrad' is gradient-level"):
        trainer(tasks, {"shape": a, "colour": a}, weighting=MeanGrad(list(tasks)))
    with pytest.raises(ConfigError, match="domain 'size' is not a task"):
        trainer(tasks, {"shape": a, "size": a})


def test_schedule_factors():
    t = trainer(schedule={"name": "step", "step_size": 2, "gamma": 0.1}, training={"epochs": 6})
    assert [t.lr_factor(e) for e in range(5)] == [1, 1, 0.1, 0.1, pytest.approx(0.01)]
    t = trainer(schedule={"name": "cosine"}, training={"epochs": 4})
    assert [t.lr_factor(e) for e in range(5)] == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                                (1 + math.cos(3 * math.pi / 4)) / 2, 0])


# -- data order --------------------------------------------------------------------------
def test_one_to_many_epoch_is_a_shuffled_pass():
    t = trainer(training={"batch_size": 5, "seed": 1})
    plans = [t.epoch_plan(e) for e in range(2)]
    for plan in plans:
        assert [len(b) for _, b in plan] == [5, 5, 2]
        assert sorted(i for _, b in plan for i, _ in b) == list(range(12))
    order = [[i for _, b in p for i, _ in b] for p in plans]
    assert order[0] != order[1]  # reshuffled each epoch...
    assert order[0] == [i for _, b in trainer(training={"batch_size": 5, "seed": 1}).epoch_plan(0) for i, _ in b]


def test_seed_streams_are_named_and_keep_the_seeds_data_orders_were_drawn_from():
    import itertools
    from collections import defaultdict

    from mtlkit.engine.sampling import Seeds, Stream, derive_seed

    seeds = Seeds(7)
    # the integers of the engine before its seeds had names: data orders stay as they were
    assert seeds.for_(Stream.DATA_ORDER, 2) == derive_seed(7, 2, 0, 0)
    assert seeds.for_(Stream.DOMAIN_PICK, 2) == derive_seed(7, 2, 0, 1)
    assert seeds.for_(Stream.SAMPLE_AUGMENT, 2, 1) == derive_seed(7, 2, 1, 2)
    assert seeds.for_(Stream.TRAINING, 1) == derive_seed(7, 1, 3)
    assert seeds.for_(Stream.LOADER, 2) == derive_seed(7, 2, 4)
    assert seeds.for_(Stream.RESEED_AFTER_WORLD_CHANGE, 1, 9) == derive_seed(7, 1, 9, 3)
    assert seeds.for_(Stream.EVAL_LOADER) == 7
    # except DOMAIN_ORDER's, which met other streams: the old (epoch, domain + 1, pass) gave
    # domain 2's first shuffle of epoch 1 the seed of rank 1's dropout stream
    assert derive_seed(7, 1, 3, 0) == derive_seed(7, 1, 3)  # (SeedSequence pads with zeros)
    assert seeds.for_(Stream.DOMAIN_ORDER, 1, 2, 0) != seeds.for_(Stream.TRAINING, 1)
    # every stream and every choice of parts has a seed of its own
    drawn = defaultdict(set)
    for stream in Stream:
        for parts in itertools.product(range(5), repeat=stream.arity):
            drawn[seeds.for_(stream, *parts)].add((stream, parts))
    assert all(len(v) == 1 for v in drawn.values()), [v for v in drawn.values() if len(v) > 1][:3]
    with pytest.raises(TypeError, match="DOMAIN_ORDER .* takes 3"):
        seeds.for_(Stream.DOMAIN_ORDER, 0, 1)  # the pass number forgotten


def m2m_plan(order, **extra):
    tasks = make_tasks()
    a, _ = make_data(num_train=9)
    b, _ = make_data(num_train=3, seed=1)
    t = trainer(tasks, {"shape": a, "colour": b},
                training={"batch_size": 3, "domain_order": order, "seed": 2, **extra})
    return t.epoch_plan(0)


def test_domain_orders():
    seq = m2m_plan("sequential")
    assert [d for d, _ in seq] == ["shape"] * 3 + ["colour"]  # a full pass over each domain in turn
    assert sorted(i for d, b in seq if d == "shape" for i, _ in b) == list(range(9))
    assert sorted(i for d, b in seq if d == "colour" for i, _ in b) == [9, 10, 11]  # after the 9 shape samples
    rr = m2m_plan("round_robin")
    assert [d for d, _ in rr] == ["shape", "colour", "shape", "shape"]
    per_domain = m2m_plan("round_robin", domain_batch_size={"shape": 2})
    assert [len(b) for d, b in per_domain if d == "shape"] == [2, 2, 2, 2, 1]
    # proportional: domains drawn ~ size^(1/T); T huge -> about uniform
    counts = Counter()
    for seed in range(40):
        counts.update(d for d, _ in m2m_plan("proportional", seed=seed))
    assert counts["shape"] / sum(counts.values()) == pytest.approx(0.75, abs=0.08)
    counts = Counter()
    for seed in range(40):
        counts.update(d for d, _ in m2m_plan("proportional", seed=seed, proportional_temperature=1e6))
    assert counts["shape"] / sum(counts.values()) == pytest.approx(0.5, abs=0.08)
    assert len(m2m_plan("sequential", max_steps_per_epoch=2)) == 2


def test_many_to_many_runs_only_the_active_branch():
    tasks = make_tasks()
    a, va = make_data(num_train=6, num_val=5)
    t = trainer(tasks, {"shape": a}, {"shape": va}, optimizer={"name": "sgd", "lr": 0.1},
                training={"epochs": 1, "batch_size": 3, "domain_loss_weight": {"shape": 0.5}})
    before = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    seen = []
    t.raw_model.heads["colour"].register_forward_hook(lambda *a: seen.append("colour"))
    t.fit()
    after = t.raw_model.state_dict()
    assert not seen
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("heads.colour"))
    assert not torch.equal(before["heads.shape.fc.weight"], after["heads.shape.fc.weight"])
    assert list(t.evaluate()) == ["shape"]


# -- weighting protocol -------------------------------------------------------------------
class Recorder(Weighting):
    def __init__(self, names):
        super().__init__(names)
        self.events = []

    def on_epoch_start(self, epoch):
        self.events.append(("start", epoch))

    def on_epoch_end(self, epoch, mean_losses):
        self.events.append(("end", epoch, dict(mean_losses)))


def test_epoch_hooks_get_mean_unweighted_losses(tmp_path):
    tasks = make_tasks()
    w = Recorder(list(tasks))
    t = trainer(tasks, weighting=w, training={"epochs": 2, "batch_size": 4}, run_dir=tmp_path)
    t.fit()
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e[:2] for e in w.events] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    for epoch in (1, 2):
        steps = [r for r in records if r["type"] == "step" and r["epoch"] == epoch]
        assert len(steps) == 3
        for task in tasks:
            mean = sum(r["losses"][task] for r in steps) / len(steps)
            assert w.events[2 * epoch - 1][2][task] == pytest.approx(mean, rel=1e-12)
    assert [r["type"] for r in records].count("eval") == 2
    step = records[0]
    assert set(step) >= {"epoch", "step", "losses", "weights", "lr", "time"}


def test_weighting_parameters_are_trained_without_decay():
    tasks = make_tasks()
    w = Uncertainty(list(tasks))
    t = trainer(tasks, weighting=w, optimizer={"lr": 0.05, "weight_decay": 0.1}, training={"epochs": 1})
    assert t.optimizer.param_groups[1]["weight_decay"] == 0.0
    t.fit()
    assert not torch.equal(w.log_vars.detach(), torch.full((2,), -0.5))


def test_gradient_level_update_matches_manual_computation(monkeypatch):
    tasks = make_tasks()
    train, _ = make_data(num_train=4)
    w = MeanGrad(list(tasks))
    t = trainer(tasks, train, weighting=w, optimizer={"name": "sgd", "lr": 1.0},
                training={"epochs": 1, "batch_size": 4})
    model = t.raw_model
    before = make_model(tasks)
    before.load_state_dict(model.state_dict())
    t.fit()
    assert w.calls == 1
    # the same step by hand: shared grads = mean of per-task grads, heads = grad of the sum
    batch = torch.utils.data.default_collate([train[i] for i, _ in t.epoch_plan(0)[0][1]])
    before.train()
    out = before(batch["image"])
    losses = {k: tasks[k].loss(out[k], batch[k]) for k in tasks}
    shared = list(before.shared_parameters())
    per_task = [torch.autograd.grad(losses[k], shared, retain_graph=True) for k in tasks]
    heads = [p for n, p in before.named_parameters() if n.startswith("heads.")]
    head_grads = torch.autograd.grad(sum(losses.values()), heads)
    expected = {id(p): p - (g0 + g1) / 2 for p, g0, g1 in zip(shared, *per_task)}
    expected.update({id(p): p - g for p, g in zip(heads, head_grads)})
    for (name, p_after), p_before in zip(model.named_parameters(), before.parameters()):
        assert torch.allclose(p_after, expected[id(p_before)], atol=1e-6), name


def test_loss_level_weighting_never_asks_for_per_task_grads(monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer(training={"epochs": 1, "batch_size": 6}).fit()
    assert calls == []


# -- evaluation, results, repeatability -----------------------------------------------------------
def test_evaluate_matches_independent_computation():
    tasks = make_tasks()
    train, val = make_data(num_train=4, num_val=9)
    t = trainer(tasks, train, val, training={"batch_size": 4})
    metrics = t.evaluate()
    model = t.raw_model.eval()
    with torch.no_grad():
        batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
        out = model(batch["image"])
    for k in tasks:
        acc = 100.0 * (out[k].argmax(1) == batch[k]).double().mean().item()
        nll = torch.nn.functional.nll_loss(out[k].double(), batch[k]).item()
        assert metrics[k]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert metrics[k]["loss"] == pytest.approx(nll, rel=1e-5)


def test_fit_writes_results_and_best_checkpoint(tmp_path):
    t = trainer(training={"epochs": 3, "batch_size": 6, "best_metric": "colour/loss", "metrics_last_n": 2},
                run_dir=tmp_path)
    final = t.fit()
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["final"] == final and len(res["history"]) == 3
    losses = [h["metrics"]["colour"]["loss"] for h in res["history"]]
    assert res["best"]["value"] == min(losses) and res["best"]["epoch"] == 1 + losses.index(min(losses))
    best = load_checkpoint(tmp_path, "best")[0]
    assert best["epoch"] == res["best"]["epoch"]
    assert res["last_n_mean"]["metrics"]["colour"]["loss"] == pytest.approx(sum(losses[-2:]) / 2)


def test_same_seed_same_weights():
    runs = [trainer(training={"epochs": 1, "batch_size": 4, "seed": s}) for s in (7, 7, 8)]
    for r in runs:
        r.fit()
    assert state_equal(runs[0].raw_model, runs[1].raw_model)
    assert not state_equal(runs[0].raw_model, runs[2].raw_model)


class Augmented(torch.utils.data.Dataset):
    """Random noise on every load (global RNGs, as typical augmentation code does)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        sample = dict(self.base[i])
        sample["image"] = sample["image"] + 0.1 * torch.randn_like(sample["image"])
        return sample


def test_augmentation_repeats_with_any_num_workers():
    tasks = make_tasks()
    train, _ = make_data(num_train=8)
    runs = []
    for workers in (0, 2):
        t = Trainer(make_model(tasks, dropout=0.5), tasks, Augmented(train), quiet=True,
                    training={"epochs": 1, "batch_size": 4, "num_workers": workers})
        t.fit()
        runs.append(t.raw_model)
    assert state_equal(*runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_device_is_a_config_error():
    with pytest.raises(ConfigError, match="training.device"):
        trainer(training={"device": "cuda"})


def test_no_run_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = trainer(training={"epochs": 1, "batch_size": 6}).fit()
    assert list(tmp_path.iterdir()) == []
    assert set(out) == {"shape", "colour"}


# -- progress ------------------------------------------------------------------------------------
class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_and_live():
    plain = io.StringIO()
    r = ProgressReporter(epochs=2, log_interval=2, stream=plain)
    r.start_epoch(0, 4)
    for s in range(1, 5):
        r.step(0, s, {"shape": 0.5, "colour": 1.25}, 0.01)
    r.end_epoch(0, {"shape": 0.5, "colour": 1.25})
    r.metrics(0, {"shape": {"accuracy": 50.0}})
    lines = plain.getvalue().splitlines()
    assert [l.split(" shape")[0] for l in lines[:2]] == ["epoch 1/2 step 2/4", "epoch 1/2 step 4/4"]
    assert "colour=1.2500" in lines[0] and "eta" in lines[0]
    assert "accuracy" in plain.getvalue() and "\x1b[" not in plain.getvalue()

    tty = FakeTTY()
    r = ProgressReporter(epochs=2, log_interval=100, stream=tty)
    assert r.live
    r.start_epoch(0, 3)
    r.step(0, 1, {"shape": 0.5}, 0.01)
    r.end_epoch(0, {"shape": 0.5})
    r.close()
    assert "epoch 1/2" in tty.getvalue() and "it/s" in tty.getvalue()
    assert not ProgressReporter(epochs=1, log_interval=1, quiet=True, stream=FakeTTY()).live
