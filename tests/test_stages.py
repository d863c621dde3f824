"""Training in stages ([[training.stages]]): the switch happens at the right epoch with the
right domains, a fresh optimiser and its own schedule; a resume in (or just before) the
second stage is bit-identical to an uninterrupted run; bad stages are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mtlkit.engine import Trainer
from mtlkit.engine.checkpoint import load_checkpoint
from mtlkit.engine.config import OptimizerConfig, ScheduleConfig, TrainingConfig
from mtlkit.engine.stages import Stages
from mtlkit.errors import ConfigError
from mtlkit.recipe.loader import load_recipe
from mtlkit.testing import TINY_CLASSIFICATION_RECIPE

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_checkpoint import assert_same_run, interrupt_after_step  # noqa: E402
from test_engine_common import Uncertainty, make_data, make_model, make_tasks  # noqa: E402

SECOND = {"epochs": 2, "domains": ["colour"], "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
          "schedule": {"name": "step", "step_size": 1, "gamma": 0.3}}
STAGES = [{"epochs": 2}, SECOND]


def lr_expected(epoch: int) -> float:
    """The recipe's SGD 0.1 halved every epoch for two epochs, then a fresh SGD 0.01 times 0.3 per epoch."""
    return 0.1 * 0.5 ** epoch if epoch < 2 else 0.01 * 0.3 ** (epoch - 2)


def build(run_dir=None, stages=STAGES):
    tasks = make_tasks()
    a, va = make_data(num_train=12)
    b, vb = make_data(num_train=8, num_val=5, seed=1)
    model = make_model(tasks, dropout=0.5)  # dropout: the RNG streams must match too
    weighting = Uncertainty(list(tasks))  # a second parameter group the fresh optimiser must hold as well
    trainer = Trainer(model, tasks, {"shape": a, "colour": b}, {"shape": va, "colour": vb}, weighting=weighting,
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                      schedule={"name": "step", "step_size": 1, "gamma": 0.5},
                      training={"batch_size": 4, "seed": 3, "log_interval": 100, "stages": stages},
                      run_dir=run_dir, quiet=True)
    return trainer, model, weighting


def spy_steps(trainer):
    """Per step: (epoch, domain, the optimiser, how many parameters it holds state for, lrs)."""
    seen = []
    step = trainer.train_step
    base = type(step)

    def call(self, batch, domain, *rest):
        opt = self.optimizer
        seen.append((trainer.epoch, domain, opt, len(opt.state), [g["lr"] for g in opt.param_groups]))
        return base.__call__(self, batch, domain, *rest)

    step.__class__ = type("Spy", (base,), {"__call__": call})
    return seen


def test_the_switch_comes_at_the_stage_boundary_with_its_domains_optimiser_and_schedule(tmp_path):
    trainer, _, _ = build(tmp_path)
    assert trainer.cfg.epochs == 4  # the stages' sum
    first = trainer.optimizer
    seen = spy_steps(trainer)
    trainer.fit()
    by_epoch = {e: [s for s in seen if s[0] == e] for e in range(4)}
    assert {d for e in (0, 1) for _, d, *_ in by_epoch[e]} == {"shape", "colour"}
    assert {d for e in (2, 3) for _, d, *_ in by_epoch[e]} == {"colour"}
    # every colour batch of the second stage: all of colour's 8 samples, once per epoch
    plan = trainer.epoch_plan(2)
    assert sorted(i for _, b in plan for i, _ in b) == list(range(12, 20))  # colour sits after shape's 12
    for e, steps in by_epoch.items():
        for _, _, opt, _, lrs in steps:
            assert lrs == pytest.approx([lr_expected(e)] * 2)  # both groups (model, weighting)
    # stage 1 keeps one optimiser; stage 2 starts a fresh one, with no momentum carried over
    assert {id(s[2]) for e in (0, 1) for s in by_epoch[e]} == {id(first)}
    fresh = by_epoch[2][0][2]
    assert fresh is not first and by_epoch[2][0][3] == 0 and by_epoch[1][-1][3] > 0
    assert fresh.defaults["momentum"] == 0.9 and {id(s[2]) for s in by_epoch[3]} == {id(fresh)}
    assert trainer.optimizer is fresh
    # the log says the same
    steps = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "step"]
    assert {r["domain"] for r in steps if r["epoch"] > 2} == {"colour"}
    assert all(r["lr"] == pytest.approx(lr_expected(r["epoch"] - 1)) for r in steps)
    assert load_checkpoint(tmp_path)[0]["stage"] == 1 and load_checkpoint(tmp_path)[0]["optimizer_stage"] == 1


def test_schedule_rules_by_hand():
    top_opt, top_sched = OptimizerConfig(name="sgd", lr=0.1), ScheduleConfig(name="cosine")
    cfg = TrainingConfig(stages=[{"epochs": 4}, {"epochs": 2, "domains": ["b"]},
                                 {"epochs": 4, "schedule": {"name": "step", "step_size": 2, "gamma": 0.1}},
                                 {"epochs": 2, "optimizer": {"name": "adam", "lr": 1e-3}}])
    s = Stages(cfg, top_opt, top_sched, {"a": [0], "b": [0]})
    assert cfg.epochs == 12 and [s.stage_of(e) for e in range(12)] == [0] * 4 + [1] * 2 + [2] * 4 + [3] * 2
    assert [s.domains(e) for e in (0, 4, 6)] == [None, ["b"], None]
    # cosine over epochs 0..5 (stage 2 goes on with it), then step from epoch 6, then the
    # fresh optimiser restarts the step schedule it finds at epoch 10
    import math
    want = [0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)] + [1, 1, 0.1, 0.1] + [1, 1]
    assert [s.lr_factor(e) for e in range(12)] == pytest.approx(want)
    assert [s.optimizer_stage(e) for e in (0, 5, 6, 10)] == [0, 0, 0, 3]
    assert s.optimizers[3].name == "adam" and s.optimizers[2] is top_opt


@pytest.mark.parametrize("where", [(3, 1), (2, 5)], ids=["mid-stage-2", "end-of-stage-1"])
def test_resume_in_the_second_stage_is_bit_identical(tmp_path, where):
    (tmp_path / "ref").mkdir()
    reference = build(tmp_path / "ref")
    reference[0].fit()
    (tmp_path / "run").mkdir()
    first = build(tmp_path / "run")
    interrupt_after_step(first[0], *where)  # (1-based epoch, step): epoch 2 has 5 steps
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    meta = load_checkpoint(tmp_path / "run")[0]
    assert (meta["epoch"] + 1, meta["step_in_epoch"]) == where
    assert meta["optimizer_stage"] == (1 if where[0] == 3 else 0)
    resumed = build(tmp_path / "run")
    resumed[0].fit(resume_from=tmp_path / "run")
    assert_same_run(reference, resumed)
    assert type(resumed[0].optimizer) is type(reference[0].optimizer)
    assert resumed[0].optimizer.param_groups[0]["lr"] == reference[0].optimizer.param_groups[0]["lr"]


STAGED = TINY_CLASSIFICATION_RECIPE.replace("epochs = 1\n", "")  # the stages give the epochs


@pytest.mark.parametrize("stages, message", [
    ('[[training.stages]]\nepochs = 0\n', "training.stages[0].epochs: Input should be greater than or equal to 1"),
    ('[[training.stages]]\nepochs = 1\n[[training.stages]]\nepochs = 1\noptimiser = { lr = 0.1 }\n',
     "training.stages[1].optimiser: unknown field, did you mean 'optimizer'?"),
    ('[[training.stages]]\nepochs = 1\n[[training.stages]]\nepochs = 1\ndomains = ["shape"]\n',
     "training.stages[1].domains: domain subsets apply to many-to-many"),
    ('[[training.stages]]\nepochs = 1\nschedule = { name = "step", step_size = 0 }\n',
     "training.stages[0].schedule.step_size: Input should be greater than or equal to 1"),
])
def test_bad_stages_are_one_line_naming_the_stage_and_field(tmp_path, stages, message):
    path = tmp_path / "r.toml"
    path.write_text(STAGED + "\n" + stages)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines


def test_epochs_default_to_the_stages_sum_and_otherwise_cut_or_extend_the_run(tmp_path):
    assert TrainingConfig(stages=[{"epochs": 1}, {"epochs": 2}]).epochs == 3
    trainer, _, _ = build(tmp_path, stages=STAGES)
    assert trainer.cfg.epochs == 4
    tasks = make_tasks()
    longer = Trainer(make_model(tasks), tasks, {"shape": make_data(num_train=12)[0],
                                                "colour": make_data(num_train=8, seed=1)[0]},
                     optimizer={"name": "sgd", "lr": 0.1}, training={"epochs": 5, "batch_size": 4, "stages": STAGES},
                     quiet=True)
    assert longer.cfg.epochs == 5 and longer.stages.stage_of(4) == 1  # the last stage goes on
    assert longer.lr_factor(4) == pytest.approx(0.3 ** 2)  # its schedule too
    assert [d for d, _ in longer.epoch_plan(4)] == ["colour", "colour"]


def test_an_unknown_stage_domain_names_the_stage():
    with pytest.raises(ConfigError, match=r"training.stages\[1\].domains: 'colours' is not a domain .*'colour'"):
        build(stages=[{"epochs": 1}, {"epochs": 1, "domains": ["colours"]}])
