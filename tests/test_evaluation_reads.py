"""Evaluation reads values back a fixed number of times, whatever the number of batches.

On an accelerator every read of a tensor's value waits for the device's queued work;
evaluation runs every epoch by default, so its metric states accumulate on the device and
the sums come back to the host once, after the last batch (``summed_on_host``). Counted
on the CPU with tests/host_reads.py (the count is what a GPU run would pay).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mtlkit
from mtlkit.build import build_tasks
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.distributed import DistContext
from mtlkit.engine.evaluation import evaluate
from mtlkit.plugins.datasets.synthetic_scenes import SyntheticScenes, SyntheticScenesParams

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import by_file, count_reads  # noqa: E402
from test_engine_common import make_data, make_model, make_tasks  # noqa: E402

BATCH = 2
PROTOCOLS = {"exact": ("exact", "exact"), "paper": ("per_image_2019", "reference")}


def dense_tasks(protocols):
    seg, other = protocols
    return build_tasks({"segmentation": ("segmentation", {"num_classes": 7, "protocol": seg}),
                        "depth": ("depth", {"protocol": other}), "normal": ("normal", {"protocol": other})})


def scenes(n):
    ds = SyntheticScenes(SyntheticScenesParams(height=16, width=16, num_train=2, num_val=n, num_classes=7), "val")
    return [ds[i] for i in range(n)]  # made up front: rendering reads tensors too


def counted(monkeypatch, model, tasks, data, **kw):
    cfg = TrainingConfig(batch_size=BATCH, device="cpu")
    counts = count_reads(monkeypatch)
    try:
        metrics = evaluate(model, tasks, data, cfg, DistContext(), **kw)
    finally:
        monkeypatch.undo()
    return counts, metrics


@pytest.mark.parametrize("protocols", PROTOCOLS.values(), ids=PROTOCOLS.keys())
def test_dense_evaluation_reads_do_not_grow_with_batches(monkeypatch, protocols):
    tasks = dense_tasks(protocols)
    torch.manual_seed(0)
    model = mtlkit.compose(backbone=("small_cnn", {"widths": [4, 8]}), attention="split", tasks=tasks)
    data = scenes(6 * BATCH)
    few, m3 = counted(monkeypatch, model, tasks, data[:3 * BATCH])
    many, m6 = counted(monkeypatch, model, tasks, data)
    assert few == many, (few, many)
    # one copy of the summed states to the host; the rest reads those host copies in compute()
    assert [k for k in many if k.startswith("cpu ")] == [k for k in many if "evaluation.py" in k]
    assert by_file(many)["evaluation.py"] == 1, many
    assert sum(many.values()) <= 12, many  # it was 6 (exact) / 8 (paper) per batch + 11
    assert m3 != m6 and all(set(m) == set(tasks[t].metrics().higher_is_better) for t, m in m6.items())


def test_classification_evaluation_reads_do_not_grow_with_batches(monkeypatch):
    tasks = make_tasks()
    model = make_model(tasks)
    _, val = make_data(num_train=2, num_val=6 * BATCH)
    data = [val[i] for i in range(len(val))]
    few, _ = counted(monkeypatch, model, tasks, data[:3 * BATCH])
    many, metrics = counted(monkeypatch, model, tasks, data)
    assert few == many, (few, many)
    assert by_file(many)["evaluation.py"] == 1, many  # both tasks' states in one copy
    assert set(metrics) == set(tasks)


def test_many_to_many_evaluation_with_domain_statistics(monkeypatch):
    """Each domain: one BatchNorm-statistics pass over its training data (one read, after the
    pass) and one evaluation (one copy of its states), however many batches either has."""
    tasks = make_tasks()
    model = make_model(tasks)
    train, val = make_data(num_train=6 * BATCH, num_val=6 * BATCH)
    train_s, val_s = [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]

    def split(samples, n):
        return {t: samples[:n] for t in tasks}

    few, _ = counted(monkeypatch, model, tasks, split(val_s, 3 * BATCH), train_data=split(train_s, 3 * BATCH))
    many, metrics = counted(monkeypatch, model, tasks, split(val_s, 6 * BATCH), train_data=split(train_s, 6 * BATCH))
    assert few == many, (few, many)
    files = by_file(many)
    assert files["bn_stats.py"] == files["evaluation.py"] == len(tasks), many
    assert set(metrics) == set(tasks)
