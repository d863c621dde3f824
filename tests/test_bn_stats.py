"""Per-domain BatchNorm statistics at evaluation (mtlkit.engine.bn_stats): the recomputed
statistics are each domain's own (closed form), evaluation uses them, training's come back
exactly, training itself is undisturbed, and accuracy improves where domains differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mtlkit.contracts import MultiTaskNetwork
from mtlkit.domains import DomainBatchNorm2d, freeze_shared
from mtlkit.engine import Trainer
from mtlkit.engine.bn_stats import domain_bn_layers, domain_statistics, shared_batchnorms
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.distributed import DistContext
from mtlkit.engine.evaluation import evaluate
from mtlkit.plugins.decathlon.synthetic import SyntheticDecathlon, SyntheticDecathlonParams
from mtlkit.plugins.tasks.classification import Classification, ClassificationParams

DOMAINS = {"omniglot": 20, "svhn": 10}  # the stand-in's classes; black-on-white vs coloured digits


class Tiny(MultiTaskNetwork):
    """conv 3x3 -> shared BN -> ReLU -> (optional domain BN) -> mean -> a linear head per domain."""

    def __init__(self, classes: dict[str, int], channels: int = 4, domain_bn: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.task_names = list(classes)
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.dbn = DomainBatchNorm2d(channels, self.task_names) if domain_bn else nn.Identity()
        self.heads = nn.ModuleDict({d: nn.Linear(channels, c) for d, c in classes.items()})

    def forward(self, x, tasks=None):
        tasks = tasks or self.task_names
        if len(tasks) == 1 and isinstance(self.dbn, DomainBatchNorm2d):
            self.dbn.set_active_task(tasks[0])
        f = self.dbn(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        return {t: torch.log_softmax(self.heads[t](f), 1) for t in tasks}


def tasks_for(classes):
    return {d: Classification(ClassificationParams(num_classes=c), name=d) for d, c in classes.items()}


def stand_in(split, n=8, size=16):
    return {d: SyntheticDecathlon(SyntheticDecathlonParams(domain=d, size=size, n=n), split) for d in DOMAINS}


def bn_input(model, ds):
    with torch.no_grad():
        return model.conv(torch.stack([ds[i]["image"] for i in range(len(ds))]))


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_only_shared_unfrozen_batchnorm_is_recomputed():
    model = Tiny(DOMAINS, domain_bn=True)
    assert shared_batchnorms(model) == [model.bn]  # the domain BN copies belong to their domains
    cfg = TrainingConfig()
    train = stand_in("train")
    assert domain_bn_layers(model, cfg, train) == [model.bn]
    assert domain_bn_layers(model, TrainingConfig(domain_bn_stats=False), train) == []  # the switch
    assert domain_bn_layers(model, cfg, {"svhn": train["svhn"]}) == []  # one domain shares nothing
    freeze_shared(model)
    assert shared_batchnorms(model) == []  # a frozen extractor keeps its statistics


@pytest.mark.parametrize("batch", [8, 4, 3])
def test_recomputed_statistics_are_the_domains_own(batch):
    model = Tiny(DOMAINS)
    model.train()
    with torch.no_grad():  # training leaves some mixed statistics behind
        model(torch.rand(5, 3, 16, 16) * 3, tasks=["svhn"])
    before = buffers(model)
    train, tasks = stand_in("train"), tasks_for(DOMAINS)
    cfg = TrainingConfig(batch_size=batch)
    for d in DOMAINS:
        y = bn_input(model, train[d])  # N C H W, in index order as the pass takes them
        parts = y.split(batch)
        mean = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)  # cumulative average of batch means
        var = torch.stack([p.transpose(0, 1).reshape(y.shape[1], -1).var(1) for p in parts]).mean(0)
        with domain_statistics(model, [model.bn], d, train[d], tasks, cfg, DistContext()):
            assert not model.training and not model.bn.training
            torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.bn.running_var, var, rtol=1e-5, atol=1e-6)
            if batch == 8:  # one batch: exactly the domain's mean and (unbiased) variance
                flat = y.transpose(0, 1).reshape(y.shape[1], -1)
                torch.testing.assert_close(model.bn.running_mean, flat.mean(1), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(model.bn.running_var, flat.var(1), rtol=1e-5, atol=1e-6)
            assert model.bn.momentum == 0.1  # restored before the domain is evaluated
        after = buffers(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert model.training and model.bn.momentum == 0.1


def test_evaluation_uses_each_domains_statistics_and_restores_training_ones():
    model = Tiny(DOMAINS, domain_bn=True)
    train, val, tasks = stand_in("train"), stand_in("val", n=4), tasks_for(DOMAINS)
    seen = {}

    def record(module, args):
        if not module.training:  # an evaluation forward
            seen.setdefault(model.dbn.active_task, module.running_mean.clone())

    model.bn.register_forward_pre_hook(record)
    before = buffers(model)
    rng = torch.get_rng_state()
    evaluate(model, tasks, val, TrainingConfig(batch_size=8), DistContext(), train_data=train)
    for d in DOMAINS:
        expected = bn_input(model, train[d]).mean((0, 2, 3))
        torch.testing.assert_close(seen[d], expected, rtol=1e-5, atol=1e-6)
    after = buffers(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # domain BN copies included
    assert torch.equal(torch.get_rng_state(), rng)


class Shifted(Dataset):
    """Two classes told apart by the sign of an image's deviation from its domain's mean
    level; domains differ in level and scale (one at 0, unit scale; one at 40, scale 10)."""

    def __init__(self, level: float, scale: float, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        sign = self.labels.float() * 2 - 1
        noise = torch.randn(n, 3, 6, 6, generator=g)
        self.images = level + scale * (sign.view(-1, 1, 1, 1) + 0.5 * noise)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def shifted_domains(n, seed):
    return {"a": Shifted(0.0, 1.0, n, seed), "b": Shifted(40.0, 10.0, n, seed + 1)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_is_undisturbed_and_accuracy_improves_where_domains_differ(seed):
    classes = {"a": 2, "b": 2}
    tasks = tasks_for(classes)
    runs = {}
    for on in (True, False):
        model = Tiny(classes, seed=seed)
        trainer = Trainer(model, tasks, shifted_domains(32, 10 * seed), shifted_domains(32, 10 * seed + 5),
                          optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                          training=dict(epochs=4, batch_size=8, seed=seed, domain_order="round_robin",
                                        domain_bn_stats=on, eval_interval=2), quiet=True)
        metrics = trainer.fit()
        runs[on] = (model, metrics, trainer.history)
    (m_on, acc_on, h_on), (m_off, acc_off, h_off) = runs[True], runs[False]
    # evaluating with recomputed statistics leaves training exactly as it was
    s_on, s_off = m_on.state_dict(), m_off.state_dict()
    assert all(torch.equal(s_on[k], s_off[k]) for k in s_on)
    mean_on = sum(acc_on[d]["accuracy"] for d in classes) / 2
    mean_off = sum(acc_off[d]["accuracy"] for d in classes) / 2
    # training statistics mix a level of 0 and 40: one domain's features land on one side of
    # every decision; its own statistics put it back where training saw it
    assert mean_on >= 90.0, (seed, acc_on)
    assert mean_on - mean_off >= 20.0, (seed, acc_on, acc_off)


DDP_SCRIPT = '''
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from test_bn_stats import DOMAINS, Tiny, stand_in, tasks_for
from mtlkit.engine.bn_stats import domain_statistics
from mtlkit.engine.config import TrainingConfig
from mtlkit.engine.distributed import setup, shutdown

torch.set_num_threads(1)
ctx = setup("cpu")
model = Tiny(DOMAINS)
train = stand_in("train", n=7)  # 4 samples on rank 0, 3 on rank 1
out = {{}}
for d in DOMAINS:
    with domain_statistics(model, [model.bn], d, train[d], tasks_for(DOMAINS), TrainingConfig(batch_size=2), ctx):
        out[d] = [model.bn.running_mean.tolist(), model.bn.running_var.tolist()]
with open(os.path.join(sys.argv[1], f"rank{{ctx.rank}}.json"), "w") as fh:
    json.dump(out, fh)
shutdown()
'''


def test_under_torchrun_every_rank_holds_the_statistics_of_all_ranks_batches(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "bn.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTLKIT_LOAD_ENTRY_POINTS="0")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    model, train = Tiny(DOMAINS), stand_in("train", n=7)
    for d in DOMAINS:
        y = bn_input(model, train[d])
        # rank r passes over samples r, r + 2, ... in batches of 2: rank 0 [0, 2] [4, 6], rank 1 [1, 3] [5]
        batches = [y[[0, 2]], y[[4, 6]], y[[1, 3]], y[[5]]]
        mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
        var = torch.stack([b.transpose(0, 1).reshape(y.shape[1], -1).var(1) for b in batches]).mean(0)
        torch.testing.assert_close(torch.tensor(r0[d][0]), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r0[d][1]), var, rtol=1e-5, atol=1e-6)
