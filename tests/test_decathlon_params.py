"""The MTAN Visual Decathlon model (WRN-28-4 + MTAN + ten classifier heads) has exactly the
published parameter count (mtan-facts): 10,237,656 = shared body 5,850,528 + shared f
969,792 + 10 x 261,344 attention + heads 803,896."""

from __future__ import annotations

import pytest
import torch

from mtlkit.plugin_manager import get_plugin_manager, get_registry
from mtlkit.plugins.decathlon.domains import DOMAINS


def _registry_with_mtan():
    registry = get_registry()
    if "mtan" not in registry.names("attention"):
        err = get_plugin_manager().failed_plugins.get("mtlkit.plugins.attention.mtan", "not registered")
        pytest.skip(f"the mtan attention plugin is not available: {err}")
    return registry


def build_decathlon_mtan(backbone_params=None, domains=None):
    registry = _registry_with_mtan()
    domains = dict(domains or DOMAINS)
    names = list(domains)
    tasks = {d: registry.get("task", "classification").build({"num_classes": n}, name=d) for d, n in domains.items()}
    head = registry.get("head", "classifier")
    heads = {d: (lambda c, t=tasks[d]: head.build({}, in_channels=c, task=t)) for d in names}
    wrn = registry.get("backbone", "wrn")
    return registry.get("attention", "mtan").build(
        {}, backbone=lambda: wrn.build(backbone_params or {}, task_names=names), heads=heads, tasks=tasks
    )


def count(params):
    return sum(p.numel() for p in params)


def test_mtan_decathlon_total_parameters():
    net = build_decathlon_mtan()
    assert count(net.parameters()) == 10_237_656
    assert count(net.backbone.parameters()) == 5_850_528
    assert count(net.heads.parameters()) == 803_896 == 257 * sum(DOMAINS.values())
    for d in DOMAINS:
        assert count(net.task_specific[d].parameters()) == 261_344
    assert count(net.shared_f.parameters()) == 969_792


def test_mtan_decathlon_forward_runs_one_domain_at_72px():
    net = build_decathlon_mtan({"depth": 10, "widen_factor": 1, "domain_bn": True},
                               domains={"svhn": 10, "daimlerpedcls": 2})
    out = net(torch.randn(2, 3, 72, 72), tasks=["daimlerpedcls"])
    assert list(out) == ["daimlerpedcls"] and out["daimlerpedcls"].shape == (2, 2)
    assert torch.allclose(out["daimlerpedcls"].exp().sum(1), torch.ones(2), atol=1e-5)
