"""Many-to-many with ``training.domain_order = "mixed"`` on the synthetic Decathlon: each step
takes one batch of every domain, each through its own branch, and the weighting sees all
their losses, so gradient-level methods work there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from mtlkit.contracts import split_parameters
from mtlkit.engine import Trainer
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.distributed import DistContext
from mtlkit.engine.sampling import epoch_plan
from mtlkit.engine.step import TrainStep
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.decathlon.synthetic import SyntheticDecathlon, SyntheticDecathlonParams
from mtlkit.plugins.tasks.classification import Classification, ClassificationParams

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_checkpoint import interrupt_at  # noqa: E402
from test_engine_common import make_model, state_equal  # noqa: E402

DOMAINS = {"svhn": 12, "ucf101": 8, "daimlerpedcls": 5}  # training samples: 3, 2, 2 batches of 4


def decathlon(split="train", n=None):
    return {d: SyntheticDecathlon(SyntheticDecathlonParams(domain=d, size=16, n=n or k), split)
            for d, k in DOMAINS.items()}


def domain_tasks():
    return {d: Classification(ClassificationParams(num_classes=SyntheticDecathlon(
        SyntheticDecathlonParams(domain=d, size=16, n=1)).num_classes, target="label"), name=d) for d in DOMAINS}


def blocks(step, data):
    """A plan step's indices per domain (indices are into the domains side by side)."""
    offsets, out, start = {}, {}, 0
    for d, ds in data.items():
        offsets[d] = (start, start + len(ds))
        start += len(ds)
    for i, _ in step[1]:
        d = next(d for d, (a, b) in offsets.items() if a <= i < b)
        out.setdefault(d, []).append(i - offsets[d][0])
    return out


def test_a_mixed_epoch_runs_until_the_longest_domain_is_through():
    data = decathlon()
    cfg = TrainingConfig(batch_size=4, domain_order="mixed", seed=1)
    plan = epoch_plan(data, cfg, 0, 0, 1)
    assert plan == epoch_plan(data, cfg, 0, 0, 1)  # a pure function: resume sees the same steps
    assert [d for d, _ in plan] == [tuple(DOMAINS)] * 3
    per = [blocks(s, data) for s in plan]
    assert sorted(sum((p["svhn"] for p in per), [])) == list(range(12))  # the longest: exactly once
    assert sorted(per[0]["ucf101"] + per[1]["ucf101"]) == list(range(8))  # then a new pass starts
    assert sorted(per[0]["daimlerpedcls"] + per[1]["daimlerpedcls"]) == list(range(5))
    assert len(per[2]["ucf101"]) == 4 and len(per[2]["daimlerpedcls"]) == 4
    # torchrun: every rank visits the same domains; each domain's pass is sharded across ranks
    ranks = [epoch_plan(data, cfg, 0, r, 2) for r in (0, 1)]
    assert [d for d, _ in ranks[0]] == [d for d, _ in ranks[1]] == [tuple(DOMAINS)] * 2
    svhn = sum((blocks(s, data)["svhn"] for r in ranks for s in r), [])
    assert sorted(svhn) == list(range(12))
    # a chosen group: the others take steps of their own, in turn with the mixed ones
    sub = TrainingConfig(batch_size=4, domain_order="mixed", mixed_domains=["svhn", "ucf101"], seed=1)
    assert [d for d, _ in epoch_plan(data, sub, 0, 0, 1)] == [("svhn", "ucf101"), ("daimlerpedcls",)] * 2 + \
        [("svhn", "ucf101")]


def reference_mixed_step(model, tasks, weighting, batch, lr):
    """Per-domain forward passes; MGDA on the shared parameters' per-domain gradients; the
    heads by the sum of the losses; SGD."""
    losses = {d: tasks[d].loss(model(b["image"], tasks=[d])[d], b["label"]) for d, b in batch.items()}
    shared, _ = split_parameters(model)
    rows = []
    for d in losses:
        grads = torch.autograd.grad(losses[d], shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)]))
    combined = weighting.combine_grads(torch.stack(rows), {d: v.detach() for d, v in losses.items()})
    rest = [p for p in model.parameters() if all(p is not q for q in shared)]
    heads = torch.autograd.grad(sum(losses.values()), rest, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(shared, combined.split([p.numel() for p in shared])):
            p -= lr * g.view_as(p)
        for p, g in zip(rest, heads):
            if g is not None:
                p -= lr * g


def test_a_gradient_method_takes_every_domain_gradient_of_a_mixed_step():
    tasks = domain_tasks()
    data = decathlon()
    mine, ref = make_model(tasks, seed=2), make_model(tasks, seed=2)
    w_mine, w_ref = (get_registry().get("weighting", "mgda").build({}, task_names=list(tasks)) for _ in range(2))
    opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    step = TrainStep(mine, mine, tasks, w_mine, opt, TrainingConfig(device="cpu", domain_order="mixed"),
                     DistContext())
    for k in range(2):
        batch = {d: default_collate([ds[(4 * k + i) % len(ds)] for i in range(4)]) for d, ds in data.items()}
        losses, weights = step(batch, tuple(DOMAINS), 0, k)
        reference_mixed_step(ref, tasks, w_ref, batch, 0.1)
        assert set(losses) == set(DOMAINS) and len(weights) == 3
        assert abs(sum(weights.values()) - 1) < 1e-6 and min(weights.values()) >= 0  # MGDA: the simplex
    for (k, a), b in zip(mine.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k


def run(run_dir, tasks=None, **training):
    tasks = tasks or domain_tasks()
    model = make_model(tasks, seed=0, dropout=0.5)
    weighting = get_registry().get("weighting", "pcgrad").build({"seed": 3}, task_names=list(tasks))
    trainer = Trainer(model, tasks, decathlon(), decathlon("val", 4), weighting=weighting,
                      optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                      training=dict(epochs=2, batch_size=4, seed=4, device="cpu", log_interval=100,
                                    domain_order="mixed", **training), run_dir=run_dir, quiet=True)
    return trainer, model, weighting


def test_mixed_training_with_pcgrad_resumes_bit_identically(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = run(tmp_path / "ref")
    ref[0].fit()
    tasks = domain_tasks()
    interrupt_at(tasks["ucf101"], 5, "signal")  # epoch 2, step 2: the step finishes, then a save
    first = run(tmp_path / "run", tasks=tasks)
    with pytest.raises(KeyboardInterrupt):
        first[0].fit()
    resumed = run(tmp_path / "run")
    resumed[0].fit(resume_from=tmp_path / "run")
    assert resumed[0].global_step == ref[0].global_step == 6
    assert state_equal(ref[1], resumed[1])
    assert ref[2].get_state() == resumed[2].get_state()
    start = make_model(domain_tasks(), seed=0, dropout=0.5)
    assert not state_equal(start, ref[1])


def test_mixed_settings_refused_where_they_do_not_apply():
    tasks = domain_tasks()
    mgda = lambda params={}: get_registry().get("weighting", "mgda").build(params, task_names=list(tasks))  # noqa: E731
    kw = dict(quiet=True)
    with pytest.raises(ConfigError, match=r"^weighting: .*gradient-level.*domain_order = \"mixed\""):
        Trainer(make_model(tasks), tasks, decathlon(), weighting=mgda(),
                training=dict(domain_order="round_robin"), **kw)
    with pytest.raises(ConfigError, match=r"^weighting: grad_target = \"features\" needs every task on one batch"):
        Trainer(make_model(tasks), tasks, decathlon(), weighting=mgda({"grad_target": "features"}),
                training=dict(domain_order="mixed"), **kw)
    with pytest.raises(ConfigError, match=r"^training.mixed_domains: 'svhm' is not a domain.*svhn"):
        Trainer(make_model(tasks), tasks, decathlon(), training=dict(domain_order="mixed", mixed_domains=["svhm"]),
                **kw)
    with pytest.raises(ConfigError, match=r"mixed_domains applies to domain_order = \"mixed\" only"):
        Trainer(make_model(tasks), tasks, decathlon(), training=dict(mixed_domains=["svhn"]), **kw)


EVEN = {"svhn": 16, "ucf101": 8, "daimlerpedcls": 8}  # multiples of the global batch: no padding


def train_even(name: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Mixed steps without BatchNorm (per-rank batch statistics would differ by design)."""
    tasks = domain_tasks()
    model = make_model(tasks, seed=0)
    for seq in list(model.backbone.first) + list(model.backbone.second):
        seq[1] = torch.nn.Identity()
    data = {d: SyntheticDecathlon(SyntheticDecathlonParams(domain=d, size=16, n=n), "train") for d, n in EVEN.items()}
    weighting = get_registry().get("weighting", name).build({}, task_names=list(tasks))
    Trainer(model, tasks, data, weighting=weighting, optimizer=dict(name="sgd", lr=0.2),
            training=dict(epochs=2, batch_size=batch_size, seed=3, device="cpu", domain_order="mixed"),
            quiet=True).fit()
    return {k: p.detach().clone().contiguous() for k, p in model.named_parameters()}


def ddp_worker(out: str, rank: int) -> None:
    from safetensors.torch import save_file

    save_file({f"{n}/{k}": v for n in ("equal", "mgda") for k, v in train_even(n, 4).items()},
              str(Path(out) / f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_mixed_steps_under_ddp_equal_one_process_on_the_global_batch(tmp_path):
    import os
    import subprocess
    import textwrap

    from safetensors.torch import load_file

    script = tmp_path / "mixed_ddp.py"
    script.write_text(textwrap.dedent(f'''
        import os, sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from test_mixed_domains import ddp_worker
        from mtlkit.engine.distributed import shutdown
        ddp_worker(sys.argv[1], int(os.environ["RANK"]))
        shutdown()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTLKIT_LOAD_ENTRY_POINTS="0")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for name in ("equal", "mgda"):
        single = train_even(name, 8)
        scale = max(float(v.abs().max()) for v in single.values())
        for r in ranks:
            diff = max(float((r[f"{name}/{k}"] - v).abs().max()) for k, v in single.items()) / scale
            assert diff < 2e-5, (name, diff)
