"""Domain-specific layers: DomainSpecific, DomainBatchNorm2d, activate_task, freeze_shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.contracts import activate_task
from mtlkit.domains import (DomainBatchNorm2d, DomainSpecific, domain_specific_or_shared,
                            domain_specific_parameters, freeze_shared)
from mtlkit.errors import ConfigError


def test_each_domain_gets_its_own_copy_and_forward_runs_the_active_one():
    layer = DomainSpecific(lambda: nn.Linear(2, 1, bias=False), ["a", "b"])
    with torch.no_grad():
        layer.domains["a"].weight.fill_(1.0)
        layer.domains["b"].weight.fill_(-2.0)
    x = torch.tensor([[1.0, 2.0]])
    assert layer.active_task == "a"  # the first domain until activated
    assert layer(x).item() == 3.0
    layer.set_active_task("b")
    assert layer(x).item() == -6.0
    assert layer.domains["a"].weight.data_ptr() != layer.domains["b"].weight.data_ptr()


def test_activate_task_switches_every_layer_in_a_model():
    model = nn.Sequential(DomainBatchNorm2d(3, ["x", "y", "z"]), nn.ReLU(), DomainBatchNorm2d(3, ["x", "y", "z"]))
    activate_task(model, "z")
    assert [m.active_task for m in model if isinstance(m, DomainSpecific)] == ["z", "z"]


def test_unknown_domain_names_it_and_lists_the_known_ones():
    bn = DomainBatchNorm2d(4, ["cifar100", "svhn"])
    with pytest.raises(ConfigError) as info:
        bn.set_active_task("cifar10")
    msg = str(info.value)
    assert "'cifar10'" in msg and "did you mean 'cifar100'" in msg and "cifar100, svhn" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("names", [[], ["a", "a"], ["a.b"]])
def test_bad_domain_names_are_config_errors(names):
    with pytest.raises(ConfigError):
        DomainBatchNorm2d(2, names)


def test_domain_bn_keeps_separate_running_statistics():
    bn = DomainBatchNorm2d(1, ["a", "b"], momentum=1.0)
    bn.train()
    bn.set_active_task("a")
    bn(torch.full((4, 1, 2, 2), 5.0) + torch.arange(4.0).view(4, 1, 1, 1))
    bn.set_active_task("b")
    bn(torch.full((4, 1, 2, 2), -3.0) + torch.arange(4.0).view(4, 1, 1, 1))
    assert bn.domains["a"].running_mean.item() == pytest.approx(6.5)
    assert bn.domains["b"].running_mean.item() == pytest.approx(-1.5)


def test_domain_specific_or_shared():
    assert isinstance(domain_specific_or_shared(lambda: nn.BatchNorm2d(2), ["a", "b"]), DomainSpecific)
    assert isinstance(domain_specific_or_shared(lambda: nn.BatchNorm2d(2), None), nn.BatchNorm2d)
    assert isinstance(domain_specific_or_shared(lambda: nn.BatchNorm2d(2), ["a"], enabled=False), nn.BatchNorm2d)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # 112 parameters
        self.bn = nn.BatchNorm2d(4)  # shared: 8 parameters
        self.dbn = DomainBatchNorm2d(4, ["a", "b"])  # 2 x 8
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)})  # 10 + 15


def test_freeze_shared_keeps_only_domain_layers_and_heads_trainable():
    net = _Net()
    assert sum(p.numel() for p in domain_specific_parameters(net)) == 16
    frozen = freeze_shared(net)
    assert frozen == 112 + 8
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == 16 + 10 + 15
    # the shared BN stays in eval mode even after .train(): its running stats do not move
    net.train()
    before = net.bn.running_mean.clone()
    net.bn(torch.randn(8, 4, 3, 3) + 10)
    assert torch.equal(net.bn.running_mean, before)
    # domain BNs still train
    net.dbn(torch.randn(8, 4, 3, 3) + 10)
    assert net.dbn.domains["a"].running_mean.abs().sum() > 0
