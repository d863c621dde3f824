"""Every weighting declares how many values one training step reads back from the device
(``Weighting.host_reads_per_step``), and a CPU run counts them: each read waits, on an
accelerator, for every queued kernel (see tests/host_reads.py)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from mtlkit.engine import Trainer
from mtlkit.engine.step import TrainStep
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from host_reads import count_list_indices, count_reads  # noqa: E402
from test_engine_common import make_data, make_model, make_tasks  # noqa: E402

STEPS = 6
PARAMS = {"auto_lambda": {"split": "train"}}  # its extra batch from the training data
# the engine's one early read per step of which tasks take part (made on the host while the
# device still runs the step's backward passes: see grad_step.present_tasks)
PRESENCE = ("mtlkit/engine/early_read.py",)


def step_reads(monkeypatch, name: str, params: dict | None = None, counter=count_reads
               ) -> tuple[Counter, int, object]:
    """Reads (or what ``counter`` counts) made inside the training steps of a short run, by
    site; the steps taken; the weighting."""
    tasks = make_tasks()
    data, _ = make_data(num_train=STEPS * 2, num_val=1)
    samples = [data[i] for i in range(len(data))]
    weighting = get_registry().get("weighting", name).build({**PARAMS.get(name, {}), **(params or {})},
                                                            task_names=list(tasks))
    trainer = Trainer(make_model(tasks), tasks, samples, weighting=weighting, optimizer={"name": "sgd", "lr": 0.05},
                      quiet=True, training={"epochs": 1, "batch_size": 2, "log_interval": STEPS, "device": "cpu"})
    counts = counter(monkeypatch)
    inside, steps = Counter(), [0]
    real_call = TrainStep.__call__

    def counted_step(self, *args, **kwargs):
        before = Counter(counts)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            steps[0] += 1
            inside.update(Counter(counts) - before)

    monkeypatch.setattr(TrainStep, "__call__", counted_step)
    trainer.fit()
    monkeypatch.undo()
    return inside, steps[0], weighting


def device_solver_methods() -> list[str]:
    """The weightings that offer ``solver = "device"``."""
    return [n for n in get_registry().names("weighting")
            if "solver" in (get_registry().get("weighting", n).params.model_fields)]


def own_reads(reads: Counter) -> Counter:
    return Counter({k: n for k, n in reads.items() if not k.split()[1].startswith(PRESENCE)})


@pytest.mark.parametrize("name", get_registry().names("weighting"))
def test_a_step_reads_what_the_weighting_declares(monkeypatch, name):
    reads, steps, _ = step_reads(monkeypatch, name)
    assert steps == STEPS
    own = own_reads(reads)
    declared = get_registry().get("weighting", name).factory.host_reads_per_step
    assert sum(own.values()) == declared * STEPS, f"{name}: {dict(own)} in {STEPS} steps, declared {declared}/step"


@pytest.mark.parametrize("name", device_solver_methods())
def test_the_device_solver_reads_nothing(monkeypatch, name):
    reads, steps, weighting = step_reads(monkeypatch, name, {"solver": "device"})
    assert steps == STEPS and weighting.host_reads_per_step == 0
    assert sum(own_reads(reads).values()) == 0, f"{name}: {dict(own_reads(reads))}"


@pytest.mark.parametrize("name", get_registry().names("weighting"))
def test_a_step_indexes_no_tensor_with_a_python_list(monkeypatch, name):
    """A list index is a blocking copy to the device (an H200's sync-debug run caught
    DB-MTL, FAMO and GradNorm doing it): steps index with device tensors."""
    found, steps, _ = step_reads(monkeypatch, name, counter=count_list_indices)
    assert steps == STEPS and not found, f"{name}: {dict(found)}"
