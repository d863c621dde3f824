"""Every registered weighting on many-to-many data (three synthetic Decathlon domains):
gradient-level methods, and those that need every task each step, train with
``domain_order = "mixed"``; loss-level ones with domains one after another; the
representation-only methods are refused there with one line naming the weighting.
The m2m column of docs/weightings.md states these."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from mtlkit.engine import Trainer
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_model  # noqa: E402
from test_mixed_domains import decathlon, domain_tasks  # noqa: E402

EVERY_TASK = {"famo", "gradnorm"}  # loss-level or not, they need every task's loss each step


def trainer(name, order):
    tasks = domain_tasks()
    model = make_model(tasks, seed=0)
    weighting = get_registry().get("weighting", name).build({}, task_names=list(tasks))
    t = Trainer(model, tasks, decathlon(), decathlon("val", 4), weighting=weighting,
                optimizer={"name": "sgd", "lr": 0.05},
                training=dict(epochs=1, batch_size=4, seed=2, device="cpu", domain_order=order), quiet=True)
    return t, model


@pytest.mark.parametrize("name", get_registry().names("weighting"))
def test_every_weighting_on_many_to_many(name):
    factory = get_registry().get("weighting", name).factory
    if tuple(getattr(factory, "grad_targets", ("params",))) == ("features",):
        with pytest.raises(ConfigError, match=r"^weighting: .*features"):
            trainer(name, "mixed")
        return
    mixed = factory.requires_grads == "shared" or name in EVERY_TASK
    if name in EVERY_TASK:  # one domain a step: refused (at the latest at the first step), naming weighting
        with pytest.raises(ConfigError, match=r"weighting.*domain_order = \"mixed\""):
            trainer(name, "round_robin")[0].fit()
    t, model = trainer(name, "mixed" if mixed else "round_robin")
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    history = t.fit()
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())
    assert max(float((p.detach() - start[k]).abs().max()) for k, p in model.named_parameters()) > 1e-4
    assert history
