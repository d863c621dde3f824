"""One rule for what is shared and what belongs to one task (contracts.split_parameters),
and the three places that use it agree: MultiTaskNetwork.shared_parameters/task_parameters,
the engine's gradient-level backward, and domains.freeze_shared."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from mtlkit.contracts import MultiTaskNetwork, Weighting, split_parameters
from mtlkit.domains import DomainBatchNorm2d, freeze_shared
from mtlkit.engine import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_common import make_data, make_tasks  # noqa: E402


class Net(MultiTaskNetwork):
    """A shared conv; a BatchNorm per task (DomainSpecific); heads that share (tie) their
    first layer, which therefore is shared, and own their last."""

    def __init__(self, classes: dict[str, int]) -> None:
        super().__init__()
        self.task_names = list(classes)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = DomainBatchNorm2d(4, self.task_names)
        tied = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({t: nn.Sequential(tied, nn.ReLU(), nn.Linear(4, n)) for t, n in classes.items()})

    def forward(self, x, tasks=None):
        f = self.conv(x)
        out = {}
        for t in tasks or self.task_names:
            self.norm.set_active_task(t)
            out[t] = torch.log_softmax(self.heads[t](self.norm(f).mean((2, 3))), 1)
        return out


def ids(params):
    return {id(p) for p in params}


def test_the_rule():
    net = Net({"shape": 4, "colour": 4})
    shared, private = split_parameters(net)
    tied = net.heads["shape"][0]
    assert ids(shared) == ids([*net.conv.parameters(), *tied.parameters()])  # tied: used by both
    for t in ("shape", "colour"):
        assert ids(private[t]) == ids([*net.norm.domains[t].parameters(), *net.heads[t][2].parameters()])
    # every parameter once, each list in parameters() order
    listed = [*shared, *(p for v in private.values() for p in v)]
    assert len(listed) == len(ids(listed)) == len(list(net.parameters()))
    for part in [shared, *private.values()]:
        assert [id(p) for p in part] == [id(p) for p in net.parameters() if id(p) in ids(part)]


def test_the_outermost_task_container_decides():
    """A whole network inside one task's part (STAN: an MTAN per task) is that task's,
    whatever its own heads and task_specific say."""
    inner = nn.Module()
    inner.trunk = nn.Linear(2, 2)
    inner.heads = nn.ModuleDict({"other": nn.Linear(2, 2)})
    outer = nn.Module()
    outer.task_specific = nn.ModuleDict({"depth": inner})
    outer.shared = nn.Linear(2, 2)
    shared, private = split_parameters(outer)
    assert ids(shared) == ids(outer.shared.parameters())
    assert list(private) == ["depth"] and ids(private["depth"]) == ids(inner.parameters())


def test_network_methods_and_freeze_shared_use_the_rule():
    net = Net({"shape": 4, "colour": 4})
    shared, private = split_parameters(net)
    assert ids(net.shared_parameters()) == ids(shared)
    assert all(ids(net.task_parameters(t)) == ids(private[t]) for t in private)
    frozen = freeze_shared(net)
    assert frozen == sum(p.numel() for p in shared)
    assert {id(p) for p in net.parameters() if not p.requires_grad} == ids(shared)


class SharedWidth(Weighting):
    """Gradient-level: records the width of the gradient matrix it is handed."""

    requires_grads = "shared"

    def __init__(self, names):
        super().__init__(names)
        self.widths = []

    def combine_grads(self, grads, losses):
        self.widths.append(grads.shape[1])
        return grads.mean(0)


def test_gradient_level_backward_combines_exactly_the_shared_parameters():
    tasks = make_tasks()
    net = Net({"shape": 4, "colour": 4})
    shared, private = split_parameters(net)
    before = {id(p): p.detach().clone() for p in net.parameters()}
    train, _ = make_data(num_train=8)
    w = SharedWidth(list(tasks))
    Trainer(net, tasks, train, weighting=w, optimizer={"name": "sgd", "lr": 0.1}, quiet=True,
            training={"epochs": 1, "batch_size": 4, "device": "cpu"}).fit()
    assert w.widths == [sum(p.numel() for p in shared)] * 2
    # the private parts learn from their own task's loss (combine), the shared from combine_grads
    assert all(not torch.equal(p, before[id(p)]) for ps in private.values() for p in ps if p.dim() > 1)
