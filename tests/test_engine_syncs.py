"""The hot loop stays on the device: values are read back once per log interval.

Every way a tensor's value reaches Python (``item``, ``tolist``, ``float()``, ``int()``,
``bool()``, ``numpy()``...) waits for the device to finish its queued work. These tests
count such reads made by mtlkit's own code (engine, model, tasks, weighting; torch's
internals are not ours to count) during ``fit`` on CPU, where a read costs nothing, so
the count is exactly what a GPU run would pay for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mtlkit.engine import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import by_file, count_reads  # noqa: E402
from test_engine_common import MeanGrad, make_data, make_model, make_tasks  # noqa: E402

EPOCHS, STEPS, TASKS = 2, 24, 2  # 48 samples in batches of 2


def train(monkeypatch, log_interval: int, weighting=None, run_dir=None):
    tasks = make_tasks()
    data, _ = make_data(num_train=STEPS * 2, num_val=1)
    samples = [data[i] for i in range(len(data))]  # made up front: generating them reads tensors too
    trainer = Trainer(make_model(tasks), tasks, samples, weighting=weighting(list(tasks)) if weighting else None,
                      optimizer={"name": "sgd", "lr": 0.05}, run_dir=run_dir, quiet=True,
                      training={"epochs": EPOCHS, "batch_size": 2, "log_interval": log_interval, "device": "cpu"})
    counts = count_reads(monkeypatch)
    trainer.fit()
    monkeypatch.undo()
    return counts


def test_loss_level_training_reads_once_per_log_interval(monkeypatch, tmp_path):
    steps = EPOCHS * STEPS
    every = train(monkeypatch, log_interval=1)
    interval = train(monkeypatch, log_interval=8, run_dir=tmp_path)
    # each epoch: one read per interval (steps 8, 16, 24); the shuffled order (a CPU
    # generator); and the checkpoint's, once: all weights finite? the RNG state as JSON
    assert by_file(interval) == {"readout.py": EPOCHS * STEPS // 8, "sampling.py": EPOCHS,
                                 "snapshot.py": EPOCHS, "state.py": EPOCHS}, interval
    # log_interval = 1 reads after every step: it is the interval, not the step, that reads
    assert by_file(every) == {"readout.py": steps, "sampling.py": EPOCHS}, every
    # (the loop used to read a float() per loss and per weight after every step)
    assert sum(interval.values()) < steps < steps * TASKS
    # the log still holds one record per step with its losses and weights
    import json

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    step_records = [r for r in records if r["type"] == "step"]
    assert [r["global_step"] for r in step_records] == list(range(1, steps + 1))
    assert all(set(r["losses"]) == set(r["weights"]) == {"shape", "colour"} for r in step_records)
    assert all(isinstance(v, float) for r in step_records for v in r["losses"].values())


def test_gradient_level_training_reads_which_tasks_take_part_each_step(monkeypatch):
    """Gradient-level weightings need one decision on the host per step (which tasks take
    part, see grad_step.present_tasks): one early read per step (started after the forward
    pass, collected after the backward passes are queued), not one per task and value."""
    counts = train(monkeypatch, log_interval=8, weighting=MeanGrad)
    per_step = [k for k in counts if "early_read.py" in k]
    assert len(per_step) == 1 and counts[per_step[0]] == EPOCHS * STEPS, counts
    assert sum(counts.values()) == EPOCHS * STEPS + EPOCHS * (1 + STEPS // 8), counts


@pytest.mark.parametrize("log_interval", [5, 7])
def test_read_outs_follow_the_interval_within_each_epoch(monkeypatch, log_interval):
    """Read-outs fall on every log_interval-th step of an epoch and on its last step (where
    the plain progress line is printed and the epoch's mean losses are due)."""
    counts = train(monkeypatch, log_interval=log_interval)
    per_epoch = 1 + -(-STEPS // log_interval)  # the order, and ceil(STEPS / interval) read-outs
    assert sum(counts.values()) == EPOCHS * per_epoch, counts
