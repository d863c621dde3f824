"""The Decathlon WRN MTAN with the reference options equals the authors' model, exactly.

``RefWRNMTAN`` below is written from the facts alone (mtan-facts, "Visual Decathlon model"),
without mtlkit's modules: pre-activation basic blocks, widths [16, 16k, 32k, 64k], a final
BN of momentum 0.9, per-domain attention a(16,16,16) then a(2c, c, c), shared f, MaxPool
after levels 0..2, ``avg_pool2d(x, 8)`` and a Linear head per domain. Its weights are
ported into mtlkit's model by order and shape; with ``final_bn_momentum = 0.9`` and the
classifier's ``pool = "reference"`` both compute the same outputs and BatchNorm statistics,
with the defaults they do not. (The full WRN-28-4 count, 10,237,656 with the ten domains, is
tested in test_decathlon_params.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import mtlkit
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry

DOMAINS = {"aircraft": 7, "daimlerpedcls": 2, "svhn": 10, "dtd": 5}
DEPTH, K = 16, 2  # two blocks a group (identity and projection shortcuts), widths 16, 32, 64, 128
REFERENCE = {"backbone": {"final_bn_momentum": 0.9}, "head": {"pool": "reference"}}


# ----------------------------------------------------------- the reference, from the facts
def conv_layer(cin, cout):  # the shared f: Conv3x3-BN-ReLU
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def att_layer(cin, mid, cout):  # g then h: Conv1x1-BN-ReLU, Conv1x1-BN-Sigmoid
    return nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid())


class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1)  # stride on the second conv
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride))

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class RefWRNMTAN(nn.Module):
    def __init__(self, depth, k, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        c = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, c[0], 3, padding=1)
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(RefBlock(c[i], c[i + 1], 2), *[RefBlock(c[i + 1], c[i + 1], 1) for _ in range(n - 1)])
            for i in range(3))
        self.bn1 = nn.BatchNorm2d(c[3], momentum=0.9)  # quirk: every other BN has 0.1
        self.f = nn.ModuleList([conv_layer(c[0], c[1]), conv_layer(c[1], c[2]), conv_layer(c[2], c[3]),
                                conv_layer(c[3], c[3])])
        self.att = nn.ModuleList([
            nn.ModuleList([att_layer(c[0], c[0], c[0])] + [att_layer(2 * c[i], c[i], c[i]) for i in (1, 2, 3)])
            for _ in num_classes])
        self.linear = nn.ModuleList([nn.Linear(c[3], m) for m in num_classes])

    def forward(self, x, k):
        g = [self.conv1(x)]
        g.append(self.layer1(g[0]))
        g.append(self.layer2(g[1]))
        g.append(F.relu(self.bn1(self.layer3(g[2]))))
        prev = None
        for j in range(4):
            mask = self.att[k][j](g[0] if j == 0 else torch.cat((g[j], prev), 1))
            prev = self.f[j](mask * g[j])
            if j < 3:
                prev = F.max_pool2d(prev, 2, 2)
        pred = F.avg_pool2d(prev, 8)  # quirk: top-left 8x8 of the 9x9 map
        return F.log_softmax(self.linear[k](pred.view(pred.size(0), -1)), 1)


def reference_model(seed=0):
    torch.manual_seed(seed)
    ref = RefWRNMTAN(DEPTH, K, list(DOMAINS.values()))
    with torch.no_grad():  # BN statistics and affines away from their identity initial values
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return ref


def mtlkit_model(reference_options: bool):
    opts = REFERENCE if reference_options else {"backbone": {}, "head": {}}
    return mtlkit.compose(
        backbone=("wrn", {"depth": DEPTH, "widen_factor": K, **opts["backbone"]}), attention="mtan",
        head=("classifier", opts["head"]),
        tasks={d: ("classification", {"num_classes": n}) for d, n in DOMAINS.items()})


def port(ref, net):
    """Copy the reference's state into ``net`` entry by entry, in order; shapes must agree."""
    src, dst = list(ref.state_dict().values()), net.state_dict()
    assert len(src) == len(dst)
    for (name, d), s in zip(dst.items(), src):
        assert d.shape == s.shape, name
    net.load_state_dict(dict(zip(dst, src)))
    return net


def states(net):
    return list(net.state_dict().values())


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 72, 72, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------- equivalence
def test_the_reference_follows_the_facts():
    ref = RefWRNMTAN(28, 4, [1000, 100, 100, 2, 47, 43, 102, 1623, 10, 101])
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    assert count(ref.conv1, ref.layer1, ref.layer2, ref.layer3, ref.bn1) == 5_850_528
    assert count(ref.f) == 969_792 and count(ref.att[0]) == 261_344 and count(ref.linear) == 803_896
    assert count(ref) == 10_237_656


def test_reference_options_give_the_authors_outputs_in_eval(x):
    ref = reference_model().eval()
    net = port(ref, mtlkit_model(True)).eval()
    with torch.no_grad():
        for k, d in enumerate(DOMAINS):
            out = net(x, tasks=[d])
            assert list(out) == [d]
            assert (out[d] - ref(x, k)).abs().max() < 1e-6, d


def test_default_options_differ_from_the_authors_outputs(x):
    ref = reference_model().eval()
    net = port(ref, mtlkit_model(False)).eval()
    with torch.no_grad():
        gaps = [(net(x, tasks=[d])[d] - ref(x, k)).abs().max() for k, d in enumerate(DOMAINS)]
    assert min(gaps) > 1e-3  # the global mean also reads the 9th row and column


def test_reference_options_give_the_authors_bn_statistics_in_training(x):
    ref, net = reference_model(), port(reference_model(), mtlkit_model(True))
    seen = {}
    ref.bn1.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach()))
    before = ref.bn1.running_mean.clone()
    k, d = 2, "svhn"
    out_ref, out = ref(x, k), net(x, tasks=[d])[d]
    assert (out - out_ref).abs().max() < 1e-6
    # the facts' momentum: running stat = 0.1 old + 0.9 batch
    batch_mean = seen["x"].mean((0, 2, 3))
    assert torch.allclose(ref.bn1.running_mean, 0.1 * before + 0.9 * batch_mean, atol=1e-6)
    bn = net.backbone.bn_final
    assert bn.momentum == 0.9
    assert torch.allclose(bn.running_mean, ref.bn1.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.bn1.running_var, atol=1e-6)
    for a, b in zip(states(net), states(ref)):  # every other buffer and parameter too
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_default_momentum_differs_only_in_the_final_bn(x):
    ref, net = reference_model(), port(reference_model(), mtlkit_model(False))
    ref(x, 0), net(x, tasks=["aircraft"])
    for name, a, b in zip(net.state_dict(), states(net), states(ref)):
        if name in ("backbone.bn_final.running_mean", "backbone.bn_final.running_var"):
            assert (a - b).abs().max() > 1e-3
        else:
            assert torch.allclose(a.float(), b.float(), atol=1e-6)


# ------------------------------------------------------------------------------ options
def wrn_params(**kw):
    return get_registry().get("backbone", "wrn").params(**kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.1, 1.5])
def test_final_bn_momentum_rejects_non_finite_and_out_of_range(bad):
    with pytest.raises(ValidationError, match=r"final_bn_momentum must be a finite number in \(0, 1\]"):
        wrn_params(final_bn_momentum=bad)


def test_options_defaults_are_the_principled_ones():
    assert wrn_params().final_bn_momentum == 0.1
    assert get_registry().get("head", "classifier").params().pool == "global"
    with pytest.raises(ValidationError, match="'global' or 'reference'"):
        get_registry().get("head", "classifier").params(pool="window")


def test_reference_pool_refuses_maps_it_cannot_pool_to_one_value():
    net = mtlkit.compose(backbone=("wrn", {"depth": 10, "widen_factor": 1}), attention="mtan",
                         head=("classifier", {"pool": "reference"}),
                         tasks={"a": ("classification", {"num_classes": 3})})
    with pytest.raises(ValueError, match="needs a final map of 8..15 pixels a side.*got 4x4"):
        net(torch.randn(2, 3, 32, 32))


RECIPE = Path(__file__).parent.parent / "recipes" / "mtan_decathlon.toml"


def test_recipe_overrides_select_the_reference_model():
    # the settings docs/concepts.md gives for reproducing the authors' model
    recipe = mtlkit.load_recipe(RECIPE, overrides=[
        "model.backbone.params.final_bn_momentum=0.9", "model.head.name='classifier'",
        "model.head.params.pool='reference'"]).recipe
    assert recipe.model.backbone.params["final_bn_momentum"] == 0.9
    assert recipe.model.head.name == "classifier" and recipe.model.head.params == {"pool": "reference"}
    with pytest.raises(ConfigError, match="final_bn_momentum"):
        mtlkit.load_recipe(RECIPE, overrides=["model.backbone.params.final_bn_momentum=nan"])
