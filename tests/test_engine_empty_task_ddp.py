"""Tasks without a target under torchrun: which tasks take part is decided from global
values (the losses or gradient rows averaged over ranks), so every rank decides alike.

Two CPU processes (gloo): rank 0 has no ``size`` label in any batch, rank 1 has them (so
``size`` takes part: its global loss is not 0), and neither has a ``colour`` label (so
``colour`` takes part nowhere). A rank that decided from its own losses would leave
``size`` out where the other keeps it, and the replicas would drift apart: the two ranks'
parameters and weighting state must stay the same, and finite. With no label at all on
either rank (some methods: the loss-level path that skips the backward under DDP's own
reducer, a default gradient-level one, one that owns its step), nothing shared moves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_empty_task import Unlabelled, make_tasks, shared  # noqa: E402
from test_engine_common import make_data, make_model  # noqa: E402
from test_engine_grad_ddp import BASE_PARAMS, grad_level_configs, rel_diff, start_ranks  # noqa: E402

TASKS = ("shape", "colour", "size")
ALL_EMPTY = [("imtl", {"mode": "loss"}), ("mgda", {}), ("famo", {})]


def configs() -> list[tuple[str, dict]]:
    """One per method (its defaults, plus the base params it needs here)."""
    return [(n, p) for n, p in grad_level_configs() if p == BASE_PARAMS.get(n, {})]


def train(name: str, params: dict, blank: list[str]) -> dict[str, torch.Tensor]:
    from mtlkit.engine import Trainer
    from mtlkit.plugin_manager import get_registry

    tasks = make_tasks(TASKS)
    model = make_model(tasks, seed=0)
    weighting = get_registry().get("weighting", name).build(params, task_names=list(TASKS))
    data, _ = make_data(num_train=16, num_val=2)
    Trainer(model, tasks, Unlabelled(data, blank), weighting=weighting, optimizer=dict(name="sgd", lr=0.2),
            training=dict(epochs=1, batch_size=4, seed=3, device="cpu", max_steps_per_epoch=2), quiet=True).fit()
    state = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    state.update({f"weighting.{k}": v.detach().clone() for k, v in weighting.state_dict().items()})
    return state


def run_all(out: str, rank: int) -> None:
    """The body of each torchrun worker."""
    from safetensors.torch import save_file

    state = {}
    for name, params in configs():
        for k, v in train(name, params, ["colour", "size"] if rank == 0 else ["colour"]).items():
            state[f"{name}/{k}"] = v.contiguous()
    for name, params in ALL_EMPTY:
        for k, v in train(name, params, list(TASKS)).items():
            state[f"{name}-empty/{k}"] = v.contiguous()
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_ranks_decide_alike_which_tasks_take_part(tmp_path):
    proc = start_ranks(tmp_path, "test_engine_empty_task_ddp")
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # ranks that disagree wait on each other's collectives; SIGTERM: torchrun stops its workers
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("the ranks hung: they did not take the same collective steps (a rank-local decision?)")
    assert proc.returncode == 0, log[-6000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    start = make_model(make_tasks(TASKS), seed=0)

    def part(state: dict, key: str, prefix: str = "") -> dict[str, torch.Tensor]:
        return {n[len(key) + 1:]: v for n, v in state.items() if n.startswith(f"{key}/{prefix}")}

    failures = []
    for key in [n for n, _ in configs()] + [f"{n}-empty" for n, _ in ALL_EMPTY]:
        a, b = part(ranks[0], key), part(ranks[1], key)
        if not all(torch.isfinite(v).all() for v in list(a.values()) + list(b.values())):
            failures.append(f"{key}: a value is not finite")
            continue
        d = rel_diff(a, b)
        if d > 1e-6:
            failures.append(f"{key}: rank 0 vs rank 1 {d:.2e}")
        if key.endswith("-empty"):
            model = make_model(make_tasks(TASKS), seed=0)
            model.load_state_dict({n[len("model."):]: v for n, v in a.items() if n.startswith("model.")}, strict=False)
            if not torch.equal(shared(model), shared(start)):
                failures.append(f"{key}: the shared trunk moved with no task to learn from")
    assert not failures, "\n".join(failures)
