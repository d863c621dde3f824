"""training.cuda_graph: the training step replayed as one CUDA graph (mtlkit/engine/graph_step.py).

On the CPU: where graphs may run and the one-line errors where they may not, the keys a
graph is captured for, the optimiser's capturable state, autocast's cache switch. On
CUDA (marked ``gpu``): training with graphs gives the same losses, step by step, as the
eager step, across epochs (re-captured), learning-rate changes, DWA's weights, a smaller
last batch (eager) and many-to-many domains (one graph each).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mtlkit
from mtlkit.contracts import Weighting
from mtlkit.engine import stages
from mtlkit.engine.config import OptimizerConfig, TrainingConfig
from mtlkit.engine.graph_step import WARMUP, GraphedStep, graph_obstacle, wants_graphs
from mtlkit.engine.optim import build_optimizer
from mtlkit.engine.precision import Precision
from mtlkit.errors import ConfigError, TrainingError
from mtlkit.plugin_manager import get_registry
from mtlkit.rundir import read_log

sys.path.insert(0, str(Path(__file__).parent))
from test_gpu import dense_recipe  # noqa: E402

CUDA = torch.device("cuda")  # a device object only: the checks below need no GPU


def weighting(name: str) -> Weighting:
    return get_registry().get("weighting", name).build({}, task_names=["a", "b"])


def cfg(**kw) -> TrainingConfig:
    return TrainingConfig(**kw)


# -- where graphs may run (CPU) ------------------------------------------------------------------
def test_graph_obstacles_name_the_reason():
    eq = weighting("equal")
    assert graph_obstacle(cfg(), eq, CUDA, False, False) is None
    cases = [
        ((cfg(), eq, torch.device("cpu"), False, False), "CUDA device"),
        ((cfg(), eq, CUDA, True, False), "torchrun"),
        ((cfg(compile=True, compile_mode="reduce-overhead"), eq, CUDA, False, False), "reduce-overhead"),
        ((cfg(compile=True, compile_mode="max-autotune"), eq, CUDA, False, False), "max-autotune"),
        ((cfg(precision="fp16"), eq, CUDA, False, False), "fp16"),
        ((cfg(domain_order="mixed"), eq, CUDA, False, True), "mixed"),
        ((cfg(), weighting("pcgrad"), CUDA, False, False), "PCGrad"),
    ]
    for args, word in cases:
        reason = graph_obstacle(*args)
        assert reason is not None and word in reason, (args, reason)
    # compiled kernels without torch.compile's own graphs are captured like any others
    for mode in ("default", "max-autotune-no-cudagraphs"):
        assert graph_obstacle(cfg(compile=True, compile_mode=mode), eq, CUDA, False, False) is None
    # "mixed" matters only many-to-many
    assert graph_obstacle(cfg(domain_order="mixed"), eq, CUDA, False, False) is None


def test_cuda_graph_on_where_it_cannot_run_is_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        wants_graphs(cfg(cuda_graph="on"), weighting("equal"), torch.device("cpu"), False, False)
    assert str(err.value).startswith("training.cuda_graph = \"on\":") and "\n" not in str(err.value)
    assert wants_graphs(cfg(cuda_graph="auto"), weighting("equal"), torch.device("cpu"), False, False) is False
    assert wants_graphs(cfg(cuda_graph="auto"), weighting("pcgrad"), CUDA, False, False) is False
    assert wants_graphs(cfg(cuda_graph="auto"), weighting("equal"), CUDA, False, False) is True
    assert wants_graphs(cfg(cuda_graph="off"), weighting("equal"), CUDA, False, False) is False


def test_recipe_with_cuda_graph_on_a_cpu_fails_before_training(tmp_path):
    from mtlkit.testing import TINY_CLASSIFICATION_RECIPE

    path = tmp_path / "r.toml"
    path.write_text(TINY_CLASSIFICATION_RECIPE + 'cuda_graph = "on"\n')
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        mtlkit.run_recipe(str(path), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # auto on a CPU: the plain step, trained as before
    path.write_text(TINY_CLASSIFICATION_RECIPE + 'cuda_graph = "auto"\n')
    built = mtlkit.build_trainer(str(path), run_dir=tmp_path / "run2")
    assert not isinstance(built.trainer.train_step, GraphedStep) and built.trainer.graphs is False


def test_graph_safe_weightings_are_loss_level_and_read_nothing():
    """A graph replays the same kernels: a graph-safe method has the engine's own backward
    and step end, asks no presence flags and reads nothing back per step."""
    safe = []
    for c in get_registry().list():
        if c.kind != "weighting":
            continue
        cls = type(weighting(c.name))
        if cls.graph_safe:
            safe.append(c.name)
            assert cls.requires_grads is None and not cls.present_only and cls.host_reads_per_step == 0, c.name
            assert cls.backward is Weighting.backward and cls.on_step_end is Weighting.on_step_end, c.name
    assert {"equal", "dwa", "uncertainty", "scale_invariant"} <= set(safe)


def test_capturable_optimiser_only_when_asked():
    net = torch.nn.Linear(3, 2)
    w = weighting("uncertainty")  # has parameters: a second group
    for name in ("adam", "adamw"):
        opt = build_optimizer(OptimizerConfig(name=name, lr=1e-3), net, w, capturable=True)
        assert all(g["capturable"] for g in opt.param_groups)
        assert not any(g["capturable"] for g in build_optimizer(OptimizerConfig(name=name), net, w).param_groups)
    fused = build_optimizer(OptimizerConfig(name="adam", fused=True), net, w, capturable=True)
    assert all(g["fused"] for g in fused.param_groups)  # fused keeps its state on the device already
    build_optimizer(OptimizerConfig(name="sgd"), net, w, capturable=True)  # SGD has no step count: no flag


def test_autocast_cache_switch():
    p = Precision("bf16", torch.device("cpu"))
    assert p.autocast()._cache_enabled is True
    p.autocast_cache = False
    assert p.autocast()._cache_enabled is False


def test_graph_keys():
    """A graph per domain, input shapes and dtypes, epoch, optimiser and learning rates."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    g = GraphedStep(SimpleNamespace(optimizer=opt))
    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.zeros(2), "names": ["x", "y"]}
    key = g._key(batch, None, 0)
    assert key == g._key({**batch, "names": ["p", "q"]}, None, 0)  # non-tensor entries: not part of it
    assert key != g._key({**batch, "image": torch.zeros(1, 3, 8, 8)}, None, 0)
    assert key != g._key({**batch, "label": torch.zeros(2, dtype=torch.long)}, None, 0)
    assert key != g._key(batch, "cifar100", 0) and key != g._key(batch, None, 1)
    opt.param_groups[0]["lr"] = 0.05
    assert key != g._key(batch, None, 0)
    g.optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.05)  # a stage's new optimiser
    assert g.step.optimizer is g.optimizer and g._key(batch, None, 0)[3] == id(g.optimizer)
    assert g._key({"a": batch}, ("a", "b"), 0) is None  # mixed domains: eager


# -- GraphedStep's bookkeeping, with a recorder in CUDA's place (CPU) -------------------------------
class Recorder:
    """Stands in for CudaGraphs: ``warm`` runs the step; ``capture`` runs it once for its
    outputs (a real capture records without running) and returns a graph whose replay runs
    it again and writes the results into those outputs in place, as a CUDA graph does."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[str] = []
        self.fail = fail
        self.step = None  # a step whose autocast cache state is recorded at each warm / capture
        self.caches: list = []

    def warm(self, run):
        self.events.append("warm")
        self.caches.append(self.step.precision.autocast_cache if self.step else None)
        return run()

    def capture(self, run, device):
        self.events.append("capture")
        self.caches.append(self.step.precision.autocast_cache if self.step else None)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        outputs = run()
        events = self.events

        class Graph:
            def replay(self):
                events.append("replay")
                values, _ = run()
                for k, v in values.items():
                    outputs[0][k].copy_(v)

        return Graph(), outputs


class FakeStep:
    """A training step that reports the sum of its batch's image as its loss."""

    def __init__(self) -> None:
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        self.ctx = SimpleNamespace(device=torch.device("cpu"))
        self.precision = Precision("fp32", torch.device("cpu"))
        self.subset_weights = None
        self.calls = 0

    def __call__(self, batch, domain, epoch=0, step=0):
        self.calls += 1
        return {"a": batch["image"].sum()}, {"a": 1.0}


def batch(value: float, n: int = 2) -> dict:
    return {"image": torch.full((n, 3), value), "names": ["x"] * n}


def test_warm_up_capture_and_replays_use_each_new_batch():
    rec, step = Recorder(), FakeStep()
    rec.step = step
    g = GraphedStep(step, backend=rec)
    losses = [g(batch(float(i)), None, 0, i)[0]["a"] for i in range(6)]
    assert rec.events == ["warm"] * WARMUP + ["capture"] + ["replay"] * (6 - WARMUP)
    assert [float(v) for v in losses] == [6.0 * i for i in range(6)]  # each step its own batch
    assert g.captures == 1 and g.replays == 6 - WARMUP
    # autocast's cache off for the warm-up and the capture alike, on again after each
    assert rec.caches == [False] * (WARMUP + 1) and step.precision.autocast_cache is True
    # returned values are copies: the next replay does not change them
    kept = losses[-1]
    g(batch(100.0), None, 0, 6)
    assert float(kept) == 30.0


def test_other_shapes_epochs_and_learning_rates_get_their_own_graphs():
    rec, step = Recorder(), FakeStep()
    g = GraphedStep(step, backend=rec)
    for i in range(WARMUP + 1):
        g(batch(1.0), None, 0, i)
    rec.events.clear()
    g(batch(1.0, n=1), None, 0, 9)  # a smaller last batch: eager (its first sighting warms)
    assert rec.events == ["warm"]
    rec.events.clear()
    step.optimizer.param_groups[0]["lr"] = 0.05  # a new learning rate: a new graph
    for i in range(WARMUP + 1):
        g(batch(1.0), None, 0, i)
    assert rec.events == ["warm"] * WARMUP + ["capture", "replay"] and len(g.graphs) == 2
    rec.events.clear()
    assert float(g(batch(2.0), None, 1, 0)[0]["a"]) == 12.0  # a new epoch: the old graphs go
    assert rec.events == ["warm"] and not g.graphs


def test_a_failed_capture_raises_under_on_and_goes_eager_under_auto():
    g = GraphedStep(FakeStep(), backend=Recorder(fail=True))
    for i in range(WARMUP):
        g(batch(1.0), None, 0, i)
    with pytest.raises(TrainingError) as err:
        g(batch(1.0), None, 0, WARMUP)
    assert "operation not permitted" in str(err.value) and "\n" not in str(err.value)
    assert "training.cuda_graph" in str(err.value)
    step, rec = FakeStep(), Recorder(fail=True)
    g = GraphedStep(step, fallback_on_error=True, backend=rec)
    for i in range(WARMUP):
        g(batch(1.0), None, 0, i)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        assert float(g(batch(3.0), None, 0, WARMUP)[0]["a"]) == 18.0  # the step still taken, eagerly
    rec.events.clear()
    calls = step.calls
    g(batch(1.0), None, 1, 0)
    assert rec.events == [] and step.calls == calls + 1 and g.disabled  # eager from then on


# -- on CUDA ---------------------------------------------------------------------------------------
def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def train(tmp_path: Path, recipe: Path | str, graph: str, name: str, overrides=None, autocast_cache=True):
    """``autocast_cache=False``: the eager step casts as a graphed run does (every step of one
    is a warm-up, a capture or a replay, all with autocast's cache off)."""
    if not isinstance(recipe, Path):  # recipe text
        path = tmp_path / f"{name}.toml"
        path.write_text(recipe)
        recipe = path
    built = mtlkit.build_trainer(str(recipe), run_dir=tmp_path / f"{name}-{graph}",
                                 overrides={"training.cuda_graph": graph, **(overrides or {})})
    if not autocast_cache:  # an eager run's own TrainStep
        built.trainer.train_step.precision.autocast_cache = False
    built.trainer.fit()
    steps = [r for r in read_log(built.run_dir) if r["type"] == "step"]
    return built.trainer, [(r["domain"], r["losses"]) for r in steps]


def same_losses(a, b, rtol=1e-3):
    assert len(a) == len(b) and a
    for (da, la), (db, lb) in zip(a, b):
        assert da == db and la.keys() == lb.keys()
        for t in la:
            assert math.isfinite(la[t]) and math.isclose(la[t], lb[t], rel_tol=rtol, abs_tol=1e-6), (la, lb)


@pytest.fixture
def restore_determinism():
    """training.deterministic switches torch's process-wide flags: put them back after."""
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])


def always_capturable(*args, capturable: bool = False, **kw) -> torch.optim.Optimizer:
    """build_optimizer as a graphed run calls it (the trainer passes capturable=False when eager)."""
    return build_optimizer(*args, capturable=True, **kw)


def graph_run_overrides(precision: str, optimizer: str) -> dict:
    """test_graphed_training_matches_eager's run (bench/graph_drift.py trains it too): 3 epochs
    of 5 steps (num_train 18, batch 4), the lr halved every epoch, deterministic algorithms."""
    return {"data.params.num_train": 18, "training.epochs": 3, "training.deterministic": True,
            "training.log_interval": 1, "training.precision": precision, "optimizer.name": optimizer,
            "optimizer.lr": 1e-3, "schedule.name": "step", "schedule.step_size": 1, "schedule.gamma": 0.5}


def test_the_eager_side_takes_the_graphed_runs_arithmetic(tmp_path, monkeypatch):
    """The eager side of test_graphed_training_matches_eager really takes capturable Adam, and
    its step's autocast runs with the cache off."""
    monkeypatch.setattr(stages, "build_optimizer", always_capturable)
    built = mtlkit.build_trainer(str(dense_recipe(tmp_path, "mtan")), run_dir=tmp_path / "run",
                                 overrides={"training.device": "cpu", "optimizer.name": "adam",
                                            "training.precision": "bf16"})
    assert built.trainer.optimizer.defaults["capturable"] and not built.trainer.graphs
    step = built.trainer.train_step
    assert isinstance(step.precision, Precision) and step.precision.autocast()._cache_enabled is True
    step.precision.autocast_cache = False  # what train(..., autocast_cache=False) does
    assert step.precision.autocast()._cache_enabled is False


def largest_gap(a, b) -> float:
    return max(abs(la[t] - lb[t]) / max(abs(lb[t]), 1e-6) for (_, la), (_, lb) in zip(a, b) for t in la)


@gpu
@pytest.mark.parametrize("weighting_name,precision,optimizer", [
    ("equal", "fp32", "sgd"),
    ("dwa", "fp32", "adam"),
    ("dwa", "bf16", "adam"),
])
def test_graphed_training_matches_eager(tmp_path, monkeypatch, restore_determinism, weighting_name, precision,
                                        optimizer):
    """3 epochs of 5 steps (num_train 18, batch 4: 4 full batches and one of 2), the lr halved
    every epoch; DWA's weights move in epoch 3. Every step's losses as the eager run's, to
    within 10x the gap between two eager runs (nll_loss's atomics make those differ too).

    The eager runs do the graphed run's arithmetic: ``capturable`` Adam (its bias correction
    in fp32 on the device) and autocast's cache off. Training is chaotic, so any rounding
    difference grows: on an H200 (2026-11-28, bench/graph_drift.py) a 1e-6 larger learning
    rate moved bf16 Adam's losses by 0.3 % at step 3 and up to 2 % by step 15. With the cache on,
    a weight used several times in one forward pass (MTAN's shared f convs, once per task)
    has its gradient summed in bf16 instead of fp32: 4e-5 apart at step 2, 6 % by step 13,
    the same on that H200's graphs and on a CPU's eager run with the cache off. With the
    same arithmetic, fp32 graphs stayed within 3.4e-6 of eager (two eager runs: the same)."""
    recipe = dense_recipe(tmp_path, "mtan", weighting_name)  # tests/test_gpu.py's tiny MTAN, 32x32
    overrides = graph_run_overrides(precision, optimizer)
    trainer, graphed = train(tmp_path, recipe, "on", "graph", overrides)
    monkeypatch.setattr(stages, "build_optimizer", always_capturable)
    eager_trainer, eager = train(tmp_path, recipe, "off", "eager", overrides, autocast_cache=False)
    _, eager2 = train(tmp_path, recipe, "off", "eager2", overrides, autocast_cache=False)
    assert optimizer == "sgd" or eager_trainer.optimizer.defaults["capturable"]
    assert not eager_trainer.train_step.precision.autocast_cache
    same_losses(graphed, eager, rtol=max(1e-3, 10 * largest_gap(eager2, eager)))
    step = trainer.train_step
    assert isinstance(step, GraphedStep)
    # each epoch: WARMUP eager steps, a capture, replays of the other full batches; the last
    # batch (2 samples) runs eagerly
    assert step.captures == 3 and step.replays == 3 * (4 - WARMUP)
    # the losses change from step to step: each replay took its own batch
    assert len({round(next(iter(l.values())), 7) for _, l in graphed}) == len(graphed)


@gpu
def test_graphed_many_to_many_one_graph_per_domain(tmp_path, restore_determinism):
    """WRN + MTAN on two written Decathlon domains, round robin: one graph per domain."""
    from mtlkit.cli import main

    root = tmp_path / "decathlon"
    assert main(["data", "synth-decathlon", str(root), "--n-train", "24", "--n-val", "4", "--n-test", "4",
                 "--image-size", "24"]) == 0
    text = ('[model.backbone]\nname = "wrn"\nparams = { depth = 10, widen_factor = 1 }\n'
            '[model.attention]\nname = "mtan"\n')
    for domain, classes in (("svhn", 10), ("gtsrb", 6)):
        text += (f'[tasks.{domain}]\nname = "classification"\nparams = {{ num_classes = {classes} }}\n'
                 f'data = {{ name = "decathlon", params = {{ root = "{root.as_posix()}", domain = "{domain}", '
                 f'image_size = 24, crop = 24, pad = 2 }} }}\n')
    text += ('[optimizer]\nname = "sgd"\nlr = 0.05\nmomentum = 0.9\n[training]\nepochs = 1\nbatch_size = 4\n'
             'device = "cuda"\ndeterministic = true\nlog_interval = 1\ndomain_order = "round_robin"\n'
             'drop_last = true\n')
    trainer, graphed = train(tmp_path, text, "on", "m2m")
    _, eager = train(tmp_path, text, "off", "m2m")
    same_losses(graphed, eager)
    step = trainer.train_step
    assert step.captures == 2 and step.replays == 2 * (24 // 4 - WARMUP)  # one graph per domain


@gpu
@pytest.mark.timeout(300)  # inductor compiles the tiny network once; the later runs hit its cache
def test_compiled_network_inside_the_step_graph_matches_compiled_eager(tmp_path, restore_determinism):
    """training.compile (inductor, default mode) with cuda_graph = "on": inductor's kernels are
    captured in the step's graph. Every step's losses as the compiled eager run's, to within
    10x the gap between two compiled eager runs; 2 epochs of 4 steps, one graph each."""
    recipe = dense_recipe(tmp_path, "mtan")
    overrides = {"data.params.num_train": 16, "training.epochs": 2, "training.deterministic": True,
                 "training.log_interval": 1, "training.drop_last": True, "training.compile": True,
                 "training.channels_last": True, "model.attention.params.fast": True,
                 "optimizer.name": "sgd", "optimizer.lr": 1e-3}
    torch._dynamo.reset()
    trainer, graphed = train(tmp_path, recipe, "on", "graph", overrides)
    _, eager = train(tmp_path, recipe, "off", "eager", overrides)
    _, eager2 = train(tmp_path, recipe, "off", "eager2", overrides)
    same_losses(graphed, eager, rtol=max(1e-3, 10 * largest_gap(eager2, eager)))
    step = trainer.train_step
    assert isinstance(step, GraphedStep) and step.captures == 2 and step.replays == 2 * (4 - WARMUP)
