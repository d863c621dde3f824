"""The Decathlon backbones: pre-activation WRN-28-4 and ResNet-26 with residual adapters."""

from __future__ import annotations

import pytest
import torch

from mtlkit.contracts import activate_task
from mtlkit.domains import DomainSpecific, domain_specific_parameters
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

DOMAINS = ["aircraft", "cifar100", "svhn"]


def build(name, params=None, **context):
    return get_registry().get("backbone", name).build(params or {}, **context)


def count(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ WRN
def test_wrn_28_4_shared_body_has_the_published_parameter_count():
    # mtan-facts: "shared body 5,850,528" = conv1 + 3 groups (biased convs) + the final BN.
    assert count(build("wrn")) == 5_850_528


def test_wrn_parameter_count_from_the_architecture():
    # Independent arithmetic: conv k x k with bias = k*k*cin*cout + cout; BN(c) = 2c.
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total = conv(3, 3, 16)
    cin = 16
    for w in (64, 128, 256):
        total += 2 * cin + conv(3, cin, w) + 2 * w + conv(3, w, w) + conv(1, cin, w)  # first block
        total += 3 * (2 * w + conv(3, w, w) + 2 * w + conv(3, w, w))
        cin = w
    total += 2 * 256
    assert total == 5_850_528
    assert count(build("wrn")) == total
    # WRN-16-2: 2 blocks a group, widths 32, 64, 128
    total16 = conv(3, 3, 16)
    cin = 16
    for w in (32, 64, 128):
        total16 += 2 * cin + conv(3, cin, w) + 2 * w + conv(3, w, w) + conv(1, cin, w)
        total16 += 2 * w + conv(3, w, w) + 2 * w + conv(3, w, w)
        cin = w
    total16 += 2 * 128
    assert count(build("wrn", {"depth": 16, "widen_factor": 2})) == total16


def test_wrn_shapes_and_taps_at_72px():
    net = build("wrn", {"depth": 10, "widen_factor": 1})
    final, taps = net.forward_taps(torch.randn(2, 3, 72, 72))
    assert final.shape == (2, 64, 9, 9)
    assert [tuple(f.shape[1:]) for _, f in taps] == [(16, 72, 72), (16, 36, 36), (32, 18, 18), (64, 9, 9)]
    assert all(g is f for g, f in taps)  # gate = feature
    info = net.feature_info
    assert [t.channels for t in info] == [16, 16, 32, 64]
    assert [t.stride for t in info] == [1, 2, 4, 8]
    assert [t.pool_after for t in info] == [True, True, True, False]
    assert {t.role for t in info} == {"encoder"}
    assert net.out_channels == 64 and net.out_stride == 8
    full = build("wrn")
    assert [t.channels for t in full.feature_info] == [16, 64, 128, 256] and full.out_channels == 256
    # the staged interface computes the same thing
    x = torch.randn(1, 3, 72, 72)
    net.eval()
    y, state = x, {}
    for i in range(net.num_stages):
        y = net.run_stage(i, y, state)
    assert torch.allclose(y, net(x))


def test_wrn_domain_bn_adds_one_bn_set_per_extra_domain():
    # BN channels of WRN-28-4: per group bn1(cin)+bn2(w) then 3 x (w + w); plus the final 256.
    bn_channels = (16 + 64 + 3 * 128) + (64 + 128 + 3 * 256) + (128 + 256 + 3 * 512) + 256
    net = build("wrn", {"domain_bn": True}, task_names=DOMAINS)
    assert count(net) == 5_850_528 + (len(DOMAINS) - 1) * 2 * bn_channels
    assert sum(p.numel() for p in domain_specific_parameters(net)) == len(DOMAINS) * 2 * bn_channels


def test_wrn_domain_bn_switches_with_activate_task():
    net = build("wrn", {"depth": 10, "widen_factor": 1, "domain_bn": True}, task_names=["a", "b"])
    net.eval()
    for m in net.modules():
        if isinstance(m, DomainSpecific):
            m.domains["b"].running_mean.fill_(0.5)
    x = torch.randn(2, 3, 72, 72)
    activate_task(net, "a")
    ya = net(x)
    activate_task(net, "b")
    yb = net(x)
    assert not torch.allclose(ya, yb)
    with pytest.raises(ConfigError, match="unknown domain 'c'"):
        activate_task(net, "c")


def test_wrn_bad_depth_is_a_config_error():
    with pytest.raises(ConfigError, match="depth"):
        build("wrn", {"depth": 27})


# ------------------------------------------------------------------------------ ResNet-26
def _units(stem=32, widths=(64, 128, 256), blocks=4):
    """(cin, cout) of every 3x3 conv of ResNet-26, computed from the architecture."""
    units = [(3, stem)]
    cin = stem
    for w in widths:
        units.append((cin, w))
        units += [(w, w)] * (2 * blocks - 1)
        cin = w
    return units


def test_resnet26_has_25_convs_and_shared_3x3_weights():
    units = _units()
    assert len(units) == 25  # + the classifier = 26 layers
    shared = sum(9 * cin * cout for cin, cout in units)
    for adapter in ("none", "series", "parallel"):
        net = build("resnet26", {"adapter": adapter}, task_names=DOMAINS)
        private = {id(p) for p in domain_specific_parameters(net)}
        assert sum(p.numel() for p in net.parameters() if id(p) not in private) == shared


@pytest.mark.parametrize("adapter", ["none", "series", "parallel"])
def test_resnet26_domain_specific_parameters(adapter):
    net = build("resnet26", {"adapter": adapter}, task_names=DOMAINS)
    units = _units()
    bn_per_unit = {"none": 1, "series": 2, "parallel": 1}[adapter]
    bn = sum(2 * cout * bn_per_unit for _, cout in units) + 2 * 256  # + the final domain BN
    if adapter == "none":
        one_by_one = 0
    elif adapter == "series":
        one_by_one = sum(cout * cout for _, cout in units)  # 1x1 on the conv's output
    else:
        one_by_one = sum(cin * cout for cin, cout in units)  # 1x1 on the conv's input
    private = domain_specific_parameters(net)
    private_conv = sum(p.numel() for p in private if p.dim() == 4)
    private_bn = sum(p.numel() for p in private if p.dim() == 1)
    assert private_conv == len(DOMAINS) * one_by_one
    assert private_bn == len(DOMAINS) * bn
    if adapter == "none":
        assert private_conv == 0  # only BatchNorms are domain-specific


def test_resnet26_shapes_taps_and_adapter_switching():
    net = build("resnet26", {"adapter": "parallel", "widths": [8, 16, 32], "stem_width": 8, "blocks_per_stage": 1},
                task_names=["a", "b"])
    final, taps = net.forward_taps(torch.randn(2, 3, 64, 64))
    assert final.shape == (2, 32, 8, 8)
    assert [tuple(f.shape[1:]) for _, f in taps] == [(8, 64, 64), (8, 32, 32), (16, 16, 16), (32, 8, 8)]
    assert [t.pool_after for t in net.feature_info] == [True, True, True, False]
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    activate_task(net, "a")
    before = net(x)
    with torch.no_grad():  # change domain b's adapters only
        for m in net.modules():
            if isinstance(m, DomainSpecific) and hasattr(m.domains["b"], "adapter"):
                m.domains["b"].adapter.weight.normal_()
    assert torch.equal(net(x), before)
    activate_task(net, "b")
    assert not torch.allclose(net(x), before)


def test_resnet26_without_task_names_has_one_domain():
    net = build("resnet26", {"adapter": "none", "widths": [8], "stem_width": 8, "blocks_per_stage": 1})
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)
    assert net.task_names == ["default"]


def test_resnet26_shared_batchnorm_is_the_plain_network():
    tiny = {"adapter": "none", "widths": [8, 16], "stem_width": 8, "blocks_per_stage": 1}
    shared = build("resnet26", {**tiny, "domain_bn": False}, task_names=DOMAINS)
    one = build("resnet26", tiny, task_names=["only"])
    # every domain runs the same layers: the plain ResNet-26, as one domain's copy of the adapted one
    assert not domain_specific_parameters(shared)
    assert not any(isinstance(m, DomainSpecific) for m in shared.modules())
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in one.parameters())
    bns = [m for m in shared.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 2 + 1  # stem, two units per block, the final BN
    for a, b in zip(shared.parameters(), one.parameters()):
        assert a.shape == b.shape
    with torch.no_grad():  # same weights, same function
        for a, b in zip(shared.parameters(), one.parameters()):
            a.copy_(b)
    shared.eval(), one.eval()
    x = torch.randn(2, 3, 16, 16)
    activate_task(shared, DOMAINS[2])
    assert torch.equal(shared(x), one(x))
    with pytest.raises(ConfigError, match="domain_bn = false needs adapter = 'none'"):
        build("resnet26", {"adapter": "series", "domain_bn": False}, task_names=DOMAINS)
