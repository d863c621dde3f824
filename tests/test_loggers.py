"""Loggers: TensorBoard event files and the CSV table hold what log.jsonl holds, also after
an interrupted and resumed run; attention masks as images; bad logger names; a
third-party logger in one file."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from mtlkit.cli import main
from mtlkit.runner import build_trainer, run_recipe

sys.path.insert(0, str(Path(__file__).parent))
from tiny_recipes import TINY_SEGMENTATION_RECIPE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# tiny MTAN: 32x32 scenes, 6 training samples in batches of 2 -> 3 steps an epoch, 2 epochs,
# every step read out (log_interval 1), an evaluation after each epoch
MTAN = TINY_SEGMENTATION_RECIPE + '\n[model.attention]\nname = "mtan"\n'
SETS = {"data.params.num_train": 6, "training.epochs": 2, "training.log_interval": 1}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def expected_scalars(recs: list[dict]) -> dict[tuple[str, int], float]:
    """What every scalar logger must hold, read from log.jsonl records: {(tag, global_step): value}."""
    out = {}
    for r in recs:
        g = r["global_step"]
        if r["type"] == "step":
            out |= {(f"train/loss/{t}", g): v for t, v in r["losses"].items()}
            out |= {(f"train/weight/{k}", g): v for k, v in r["weights"].items()}
            out[("train/lr", g)] = r["lr"]
        elif r["type"] == "epoch":
            out |= {(f"epoch/loss/{t}", g): v for t, v in r["losses"].items()}
        elif r["type"] == "eval":
            out |= {(f"eval/{t}/{m}", g): v for t, ms in r["metrics"].items() for m, v in ms.items()}
    return out


def tensorboard_events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def write_recipe(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(MTAN + extra)
    return path


def interrupt_at_loss_call(trainer, call: int) -> None:
    """A KeyboardInterrupt inside the ``call``-th step (a second Ctrl-C): nothing is saved,
    the last checkpoint stays, and the steps logged after it are redone on resume."""
    task = trainer.tasks["segmentation"]
    original, count = task.loss, {"n": 0}

    def loss(prediction, target):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return original(prediction, target)

    task.loss = loss


def test_tensorboard_and_csv_hold_log_jsonl_after_an_interrupted_resumed_run(tmp_path):
    from mtlkit.runner import RunInterrupted

    recipe = write_recipe(tmp_path, '\n[[loggers]]\nname = "csv"\n')
    run = tmp_path / "run"
    built = build_trainer(recipe, overrides=SETS, run_dir=run, loggers=["tensorboard"])
    interrupt_at_loss_call(built.trainer, 5)  # epoch 2, step 2; the checkpoint is epoch 1's end
    with pytest.raises(RunInterrupted):
        built.fit()
    assert max(r["global_step"] for r in records(run)) == 4  # step 4 was logged past the checkpoint
    assert max(int(row["global_step"]) for row in csv.DictReader(open(run / "scalars.csv"))) == 4
    run_recipe(resume=run, quiet=True)  # the run folder's recipe names both loggers

    recs = records(run)
    assert [r["global_step"] for r in recs if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    expected = expected_scalars(recs)
    assert ("eval/segmentation/miou", 6) in expected and ("train/weight/segmentation", 4) in expected

    # CSV: one row per (tag, step), the very values of log.jsonl (repr round-trips floats)
    rows = list(csv.DictReader(open(run / "scalars.csv", newline="")))
    table = {(row["tag"], int(row["global_step"])): float(row["value"]) for row in rows}
    assert len(table) == len(rows), "a value logged twice"
    assert {k: v for k, v in table.items() if k in expected} == pytest.approx(expected, rel=0, abs=0, nan_ok=True)
    assert {k for k in table if k not in expected} <= {(t, g) for t, g in table if t.startswith(
        ("train/step_time_s", "epoch/weight/"))}

    # TensorBoard: every tag's steps once each, values as log.jsonl's (stored as float32)
    acc = tensorboard_events(run / "tensorboard")
    for tag in {t for t, _ in expected}:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == sorted({g for t, g in expected if t == tag}), tag
        for e in events:
            assert e.value == pytest.approx(expected[(tag, e.step)], rel=1e-6, abs=1e-7, nan_ok=True), (tag, e.step)
    # step time: seconds between consecutive steps of one process (the first step after
    # the resume has no step before it in its process, and step 4 of the first one was purged)
    elapsed = {r["global_step"]: r["elapsed"] for r in recs if r["type"] == "step"}
    times = {e.step: e.value for e in acc.Scalars("train/step_time_s")}
    assert sorted(times) == [1, 2, 3, 5, 6]
    for g, v in times.items():
        assert v == pytest.approx(elapsed[g] - elapsed.get(g - 1, 0.0), rel=1e-5, abs=1e-6)
        assert v > 0

    # attention masks as images at each evaluation: the input strip and 10 SegNet levels
    evals = [r["global_step"] for r in recs if r["type"] == "eval"]
    image_tags = acc.Tags()["images"]
    assert "attention/input" in image_tags
    assert sorted(t for t in image_tags if t.startswith("attention/segmentation/")) == sorted(
        f"attention/segmentation/level_{i}" for i in range(10))
    for tag in image_tags:
        assert [im.step for im in acc.Images(tag)] == evals, tag
    level0 = acc.Images("attention/segmentation/level_0")[0]
    assert (level0.height, level0.width) == (32, 2 * 32 + 1)  # two samples side by side


def test_image_logging_leaves_the_rngs_alone(tmp_path):
    """Reading samples for the masks may draw random numbers; training must not notice."""
    from mtlkit.build import build_parts
    from mtlkit.engine.loggers import Logger, LoggerSet
    from mtlkit.recipe.loader import load_recipe

    class Images(Logger):
        wants_images = 2

        def log(self, records):
            pass

        def log_images(self, epoch, global_step, images):
            self.images = images

    class Drawing(torch.utils.data.Dataset):  # a data set whose samples draw from the global RNG
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            torch.rand(1)
            return self.base[i]

    parts = build_parts(load_recipe(write_recipe(tmp_path)).recipe)
    logger = Images()
    parts.model.train()
    before = torch.get_rng_state()
    LoggerSet({"images": logger}).log_images(parts.model, Drawing(parts.val_data), 1, 1)
    assert torch.equal(torch.get_rng_state(), before) and parts.model.training
    masks = {k: v for k, v in logger.images.items() if k.startswith("attention/segmentation/")}
    assert len(masks) == 10 and all(0 <= v.min() and v.max() <= 1 for v in masks.values())


def test_resume_may_add_a_logger(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--set", "model.backbone.params.widths=[4, 8]", "--set", "data.params.size=8",
            "--set", "data.params.num_train=8", "--set", "data.params.num_val=4",
            "--set", "training.batch_size=4", "--set", "training.device='cpu'", "--quiet"]
    assert main(["run", "shapes", *tiny, "--set", "training.epochs=1", "--run-dir", str(run)]) == 0
    assert not (run / "scalars.csv").exists()  # the default: log.jsonl alone
    assert main(["run", "--resume", str(run), "--set", "training.epochs=2", "--logger", "csv", "--quiet"]) == 0, \
        capsys.readouterr().err
    steps = sorted({int(r["global_step"]) for r in csv.DictReader(open(run / "scalars.csv"))})
    assert steps == [3, 4]  # the second epoch only
    assert 'name = "csv"' in (run / "recipe.toml").read_text()


def test_jsonl_is_implicit_and_written_once(tmp_path):
    from mtlkit.recipe.loader import load_recipe

    recipe = write_recipe(tmp_path)
    assert load_recipe(recipe).resolved["loggers"] == [{"name": "jsonl", "params": {}}]
    listed = write_recipe(tmp_path, '\n[[loggers]]\nname = "jsonl"\n')
    assert [ref.name for ref in load_recipe(listed, loggers=["jsonl", "csv"]).recipe.loggers] == ["jsonl", "csv"]
    result = run_recipe(listed, overrides={"training.epochs": 1}, run_dir=tmp_path / "run", loggers=["jsonl"])
    steps = [r for r in records(result.run_dir) if r["type"] == "step"]
    assert [r["global_step"] for r in steps] == [1]  # one step, once


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_logger_is_one_line_and_writes_nothing(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--logger", "tensorbord", "--runs-dir", str(runs), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "--logger tensorbord" in line and "did you mean 'tensorboard'" in line
    assert not runs.exists()

    bad = write_recipe(tmp_path, '\n[[loggers]]\nname = "csvv"\n')
    assert main(["run", str(bad), "--runs-dir", str(runs), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "[loggers.0] name" in line and "did you mean 'csv'" in line
    assert not runs.exists()

    twice = write_recipe(tmp_path, '\n[[loggers]]\nname = "csv"\n[[loggers]]\nname = "csv"\n')
    assert main(["validate", str(twice)]) == 2
    assert "[loggers.1] name: logger 'csv' is listed twice" in one_error_line(capsys)

    outside = write_recipe(tmp_path, '\n[[loggers]]\nname = "csv"\nparams = { file = "../x.csv" }\n')
    assert main(["validate", str(outside)]) == 2
    assert "[loggers.0.params] file" in one_error_line(capsys)


def test_missing_tensorboard_package_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    recipe = write_recipe(tmp_path)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--logger", "tensorboard", "--runs-dir", str(runs), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "tensorboard" in line and "pip install 'mtlkit[tensorboard]'" in line
    assert not runs.exists()


def test_a_failing_logger_stops_the_run_with_one_line_naming_it(tmp_path):
    from mtlkit.engine import Trainer
    from mtlkit.engine.loggers import Logger
    from mtlkit.errors import TrainingError

    class Broken(Logger):
        def log(self, records):
            raise OSError("disk full")

    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine_common import make_data, make_model, make_tasks

    tasks = make_tasks()
    train, val = make_data(num_train=8)
    trainer = Trainer(make_model(tasks), tasks, train, val, training={"epochs": 1, "batch_size": 4},
                      run_dir=tmp_path, quiet=True, loggers={"tracker": Broken()})
    with pytest.raises(TrainingError) as e:
        trainer.fit()
    assert str(e.value) == "logger 'tracker': log failed: OSError: disk full"


def doc_logger_example() -> str:
    """The third-party logger of docs/writing-plugins.md, as the page shows it."""
    guide = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    section = guide.split("## Loggers", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_third_party_logger_is_one_file_named_in_the_recipe(tmp_path, fresh_pm):
    (tmp_path / "summary_logger.py").write_text(doc_logger_example())
    recipe = tmp_path / "tracked.toml"
    recipe.write_text('plugins = ["summary_logger.py"]\n' + MTAN + '\n[[loggers]]\nname = "summary"\n')
    result = run_recipe(recipe, overrides={"training.epochs": 1, "data.params.num_train": 4},
                        run_dir=tmp_path / "run")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    recs = records(result.run_dir)
    last_step = [r for r in recs if r["type"] == "step"][-1]
    last_eval = [r for r in recs if r["type"] == "eval"][-1]
    assert last_step["global_step"] == 2
    assert summary["train/loss/segmentation"] == {"value": last_step["losses"]["segmentation"], "global_step": 2}
    assert summary["eval/segmentation/miou"]["value"] == last_eval["metrics"]["segmentation"]["miou"]
    plugin = next(n for n, src in fresh_pm.sources.items() if src == "recipe")
    assert [c.name for c in fresh_pm.registry.list("logger") if c.plugin == plugin] == ["summary"]
