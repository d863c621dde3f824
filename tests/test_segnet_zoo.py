"""SegNet, its heads and the SegNet-based architectures, at tiny sizes (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlkit.contracts import MultiTaskNetwork, StagedBackbone
from mtlkit.errors import ConfigError
from mtlkit.plugin_manager import get_registry


from mtlkit.testing import StandInTask


def nyu_tasks():
    return {
        "segmentation": StandInTask("segmentation", "segmentation", 13, "log_softmax"),
        "depth": StandInTask("depth", "depth", 1),
        "normal": StandInTask("normal", "normal", 3, "l2_normalize"),
    }


def segnet(**params):
    return get_registry().get("backbone", "segnet").build(params)


def build(attention, att_params=None, backbone="segnet", bb_params=None, tasks=None):
    reg = get_registry()
    tasks = tasks or nyu_tasks()
    head_name = "dense_pred" if backbone == "segnet" else "classifier"

    def make_backbone():
        return reg.get("backbone", backbone).build(bb_params if bb_params is not None else {"width": 0.125})

    heads = {t: (lambda c, t=t: reg.get("head", head_name).build({}, in_channels=c, task=tasks[t])) for t in tasks}
    return reg.get("attention", attention).build(att_params or {}, backbone=make_backbone, heads=heads, tasks=tasks)


def convs_of(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------- SegNet
def test_segnet_conv_plan_matches_vgg16_segnet():
    with torch.device("meta"):
        net = segnet()
    io = [(c.in_channels, c.out_channels) for c in convs_of(net)]
    expected = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
                (512, 512), (512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
                (256, 128), (128, 128), (128, 128), (128, 64), (64, 64), (64, 64), (64, 64)]
    assert io == expected
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs_of(net))
    assert [len(s) for s in net.stages] == [2, 2, 3, 3, 3, 3, 3, 3, 2, 2]
    assert sum(p.numel() for p in net.parameters()) == 24_943_296
    assert isinstance(net, StagedBackbone) and net.out_channels == 64 and net.out_stride == 1


def test_segnet_deep_and_wide_and_width():
    with torch.device("meta"):
        deep = segnet(deep=True)
        wide = segnet(widths=[64, 128, 256, 512, 1024])
        small = segnet(width=0.125)
    assert len(convs_of(deep)) == 52
    assert all(c.in_channels == c.out_channels for c in convs_of(deep)[1::2])
    assert [t.channels for t in wide.feature_info[:5]] == [64, 128, 256, 512, 1024]
    assert wide.feature_info[5].gate_channels == 1024
    assert small.widths == [8, 16, 32, 64, 64]
    with torch.device("meta"):
        assert segnet(width=0.001).widths == [1, 1, 1, 1, 1]  # max(1, round(w * c))


@pytest.mark.parametrize("bad", [{"width": 0.0}, {"width": -1.0}, {"widths": [64, 0, 256, 512, 512]}])
def test_segnet_empty_stage_is_a_config_error(bad):  # a params error: `mtlkit validate` sees it
    with pytest.raises(ConfigError, match=r"\[model\.backbone\.params(\] |\.)width"):
        segnet(**bad)


def test_segnet_widths_needs_five_entries():
    with pytest.raises(ConfigError, match="widths"):
        segnet(widths=[64, 128])


def test_segnet_init_is_xavier_normal_zero_bias_bn_one_zero():
    torch.manual_seed(0)
    net = segnet(width=0.5)
    conv = convs_of(net)[10]  # 256 -> 256, 3x3
    fan_in = fan_out = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.03)
    assert conv.weight.mean().abs().item() < 2e-3
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs_of(net))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_segnet_taps_follow_the_feature_contract():
    torch.manual_seed(0)
    net = segnet(width=0.125).eval()
    x = torch.randn(2, 3, 64, 96)
    final, taps = net.forward_taps(x)
    info = net.feature_info
    assert [t.role for t in info] == ["encoder"] * 5 + ["decoder"] * 5
    assert all(t.pool_after for t in info[:5]) and not any(t.pool_after for t in info[5:])
    assert [t.stride for t in info] == [1, 2, 4, 8, 16, 16, 8, 4, 2, 1]
    for tap, (gate, feat) in zip(info, taps):
        assert gate.shape[1] == tap.gate_channels and feat.shape[1] == tap.channels
        assert feat.shape[-2:] == (64 // tap.stride, 96 // tap.stride)
    assert torch.equal(final, taps[-1][1]) and final.shape == (2, 8, 64, 96)
    assert torch.equal(net(x), final)

    # encoder level 1: gate = output of the stage's first conv layer on the pooled level 0
    pooled0 = F.max_pool2d(taps[0][1], 2)
    gate1 = net.stages[1][0](pooled0)
    assert torch.allclose(taps[1][0], gate1, atol=1e-6)
    assert torch.allclose(taps[1][1], net.stages[1][1](gate1), atol=1e-6)
    # decoder: gate = max-unpooled input: nonzero only where the encoder's max was, so at
    # most one pixel of each 2x2 window; feature = last conv output of the stage
    pooled4, idx4 = F.max_pool2d(taps[4][1], 2, return_indices=True)
    assert torch.equal(taps[5][0], F.max_unpool2d(pooled4, idx4, 2, output_size=taps[4][1].shape[-2:]))
    top_gate = taps[9][0]
    per_window = (top_gate != 0).float().reshape(2, 8, 32, 2, 48, 2).sum((3, 5))
    assert per_window.max() <= 1


def test_segnet_staged_run_equals_forward():
    torch.manual_seed(0)
    net = segnet(width=0.125).eval()
    x = torch.randn(1, 3, 32, 64)
    state, y = {}, x
    for i in range(net.num_stages):
        y = net.run_stage(i, y, state)
        assert y.shape[1] == net.stage_out_channels[i]
    assert torch.allclose(y, net(x), atol=1e-6)
    assert net.stage_roles == ["encoder"] * 5 + ["decoder"] * 5


# --------------------------------------------------------------------------- head
def test_dense_pred_is_two_convs_with_nothing_between_and_applies_activation():
    reg = get_registry()
    torch.manual_seed(0)
    task = StandInTask("depth", "depth", 1)
    head = reg.get("head", "dense_pred").build({}, in_channels=8, task=task)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs_of(head)] == [(8, 8, (3, 3)), (8, 1, (1, 1))]
    assert sum(p.numel() for p in head.parameters()) == 8 * 8 * 9 + 8 + 8 + 1
    # nothing nonlinear between the convs: the head is affine in its input
    a, b, z = torch.randn(2, 1, 8, 5, 5), torch.randn(1, 8, 5, 5), torch.zeros(1, 8, 5, 5)
    h0 = head(z)
    assert torch.allclose(head(a[0] + a[1]) - h0, (head(a[0]) - h0) + (head(a[1]) - h0), atol=1e-5)
    assert torch.allclose(head(-3 * b) - h0, -3 * (head(b) - h0), atol=1e-5)

    seg = reg.get("head", "dense_pred").build({"mid_channels": 4}, in_channels=8,
                                               task=StandInTask("s", "s", 5, "log_softmax"))
    assert convs_of(seg)[0].out_channels == 4
    assert torch.allclose(seg(b).exp().sum(1), torch.ones(1, 5, 5), atol=1e-5)
    nrm = reg.get("head", "dense_pred").build({}, in_channels=8, task=StandInTask("n", "n", 3, "l2_normalize"))
    assert torch.allclose(nrm(b).norm(dim=1), torch.ones(1, 5, 5), atol=1e-5)


# --------------------------------------------------------------------------- MTAN
def manual_mtan_branch(net, task, taps):
    """MTAN written out level by level for SegNet (5 encoder + 5 decoder taps)."""
    a, f = net.task_specific[task], net.shared_f
    prev = None
    for j in range(5):
        gate, feat = taps[j]
        mask = a[j](gate) if j == 0 else a[j](torch.cat((gate, prev), 1))
        prev = F.max_pool2d(f[j](mask * feat), 2, 2)
    for j in range(5, 10):
        gate, feat = taps[j]
        up = f[j](F.interpolate(prev, scale_factor=2, mode="bilinear", align_corners=True))
        prev = a[j](torch.cat((gate, up), 1)) * feat
    return prev


def test_mtan_structure_matches_the_reference_on_segnet():
    with torch.device("meta"):
        net = build("mtan", bb_params={})
    fs = [(s[0].in_channels, s[0].out_channels) for s in net.shared_f]
    assert fs[:5] == [(64, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    # decoder f, deepest first (the facts list them shallowest first: 64->64 ... 512->512)
    assert fs[5:] == [(512, 512), (512, 256), (256, 128), (128, 64), (64, 64)]
    att = [(m[0].in_channels, m[0].out_channels, m[3].out_channels) for m in net.task_specific["depth"]]
    assert att == [(64, 64, 64), (256, 128, 128), (512, 256, 256), (1024, 512, 512), (1024, 512, 512),
                   (1024, 512, 512), (768, 256, 256), (384, 128, 128), (192, 64, 64), (128, 64, 64)]
    for m in net.task_specific["depth"]:
        assert [type(x) for x in m] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid]
        assert m[0].kernel_size == (1, 1) and m[3].kernel_size == (1, 1)
    shared = sum(p.numel() for p in net.shared_parameters())
    assert shared == 24_943_296 + 6_272_640 + 3_947_520


def test_mtan_forward_equals_the_written_out_computation_and_task_subsets():
    torch.manual_seed(0)
    net = build("mtan")  # train mode: BN uses batch statistics, so features keep unit scale
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    _, taps = net.backbone.forward_taps(x)
    for t in net.task_names:
        expected = net.heads[t](manual_mtan_branch(net, t, taps))
        assert torch.allclose(out[t], expected, atol=1e-5)
    only = net(x, ["normal"])
    assert list(only) == ["normal"] and torch.allclose(only["normal"], out["normal"], atol=1e-6)


def test_mtan_task_loss_reaches_only_its_own_attention():
    torch.manual_seed(0)
    net = build("mtan")
    out = net(torch.randn(2, 3, 32, 32))
    out["depth"].mean().backward()
    grads = {t: sum(float(p.grad.abs().sum()) for p in net.task_parameters(t) if p.grad is not None)
             for t in net.task_names}
    assert grads["depth"] > 0 and grads["segmentation"] == 0 and grads["normal"] == 0
    assert all(p.grad is not None for p in net.shared_f.parameters())


def test_mtan_is_generic_over_encoder_only_backbones():
    reg = get_registry()
    tasks = {"a": StandInTask("a", "label", 4, "log_softmax"), "b": StandInTask("b", "label", 2, "log_softmax")}
    net = build("mtan", backbone="small_cnn", bb_params={"widths": [8, 16, 32]}, tasks=tasks)
    att = [(m[0].in_channels, m[0].out_channels) for m in net.task_specific["a"]]
    assert att == [(8, 8), (32, 16), (64, 32)]
    assert [(s[0].in_channels, s[0].out_channels) for s in net.shared_f] == [(8, 16), (16, 32), (32, 32)]
    out = net(torch.randn(3, 3, 16, 16))
    assert out["a"].shape == (3, 4) and out["b"].shape == (3, 2)
    if "wrn" in reg.names("backbone"):  # the Decathlon WRN-28-4 (another plugin)
        with torch.device("meta"):
            wrn_net = build("mtan", backbone="wrn", bb_params={}, tasks=tasks)
        per_task = sum(p.numel() for p in wrn_net.task_specific["a"].parameters())
        assert per_task == 261_344
        assert sum(p.numel() for p in wrn_net.shared_f.parameters()) == 969_792


def test_mtan_refuses_a_backbone_without_taps():
    class NoTaps(nn.Module):
        out_channels, out_stride = 3, 1

        def forward(self, x):
            return x

    reg = get_registry()
    tasks = nyu_tasks()
    with pytest.raises(ConfigError, match="model.attention"):
        reg.get("attention", "mtan").build({}, backbone=NoTaps, heads={t: None for t in tasks}, tasks=tasks)


# --------------------------------------------------------------------------- single / STAN
def test_single_networks_are_independent_and_stan_is_one_task_mtan():
    torch.manual_seed(0)
    one = build("single")
    assert isinstance(one, MultiTaskNetwork) and list(one.shared_parameters()) == []
    per_task = {t: sum(p.numel() for p in one.task_parameters(t)) for t in one.task_names}
    total = sum(p.numel() for p in one.parameters())
    assert total == sum(per_task.values())
    out = one(torch.randn(2, 3, 32, 32))
    out["segmentation"].mean().backward()
    assert all(p.grad is None for p in one.task_specific["depth"].parameters())

    stan = build("single", {"inner": "mtan"})
    assert list(stan.shared_parameters()) == []
    inner = stan.task_specific["depth"]
    assert inner.task_names == ["depth"] and len(inner.task_specific["depth"]) == 10
    out = stan(torch.randn(2, 3, 32, 32), ["depth"])
    assert list(out) == ["depth"] and out["depth"].shape == (2, 1, 32, 32)


# --------------------------------------------------------------------------- cross-stitch
def test_cross_stitch_units_are_kxk_and_identity_units_give_independent_networks():
    torch.manual_seed(0)
    net = build("cross_stitch")  # train mode (batch-stat BN keeps deep features at unit scale)
    assert len(net.stitch) == 9
    alpha = net.stitch[0].detach()
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(alpha.sum(1), torch.ones(3)) and torch.allclose(alpha[0, 1], torch.tensor(0.05))
    x = torch.randn(2, 3, 32, 32)
    mixed = net(x)
    with torch.no_grad():
        for a in net.stitch:
            a.copy_(torch.eye(3))
    plain = net(x)
    for t in net.task_names:
        alone = net.heads[t](net.task_specific[t](x))
        assert torch.allclose(plain[t], alone, atol=1e-5)
        assert not torch.allclose(mixed[t], plain[t], atol=1e-4)
    # a task's output depends on another task's network only through the units
    with torch.no_grad():
        net.stitch[3][1, 0] = 0.5
    changed = net(x)
    assert torch.allclose(changed["segmentation"], plain["segmentation"], atol=1e-6)
    assert not torch.allclose(changed["depth"], plain["depth"], atol=1e-4)


def test_cross_stitch_and_dense_refuse_unstaged_backbones():
    for att in ("cross_stitch", "dense"):
        with pytest.raises(ConfigError, match="model.attention"):
            build(att, backbone="small_cnn", bb_params={}, tasks={"a": StandInTask("a", "label", 3)})


# --------------------------------------------------------------------------- dense
def test_dense_task_networks_read_the_shared_features():
    torch.manual_seed(0)
    net = build("dense")
    assert len(net.backbone.stages[-1]) == 0  # the shared last stage's output is never read
    first = [c for c in convs_of(net.task_specific["depth"])]
    assert first[0].in_channels == 3 and first[2].in_channels == 2 * 8  # stage 1 reads cat(task, shared)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert {t: tuple(o.shape) for t, o in out.items()} == {
        "segmentation": (2, 13, 32, 32), "depth": (2, 1, 32, 32), "normal": (2, 3, 32, 32)}
    # perturbing the shared network changes every task; perturbing a task network only that task
    with torch.no_grad():
        # (not a rescaling: batch-stat BN right after the conv would undo it)
        net.backbone.stages[2][0][0].weight.add_(0.2 * torch.randn_like(net.backbone.stages[2][0][0].weight))
    shared_changed = net(x)
    assert all(not torch.allclose(shared_changed[t], out[t], atol=1e-4) for t in out)
    with torch.no_grad():
        w = net.task_specific["normal"].stages[3][0][0].weight
        w.add_(0.2 * torch.randn_like(w))
    task_changed = net(x)
    assert torch.allclose(task_changed["depth"], shared_changed["depth"], atol=1e-6)
    assert not torch.allclose(task_changed["normal"], shared_changed["normal"], atol=1e-4)
    assert list(net(x, ["depth"])) == ["depth"]


# --------------------------------------------------------------------------- timm
def timm_tasks():
    return {"a": StandInTask("a", "label", 5, "log_softmax"), "b": StandInTask("b", "label", 3, "log_softmax")}


def test_timm_backbone_taps_and_split_and_mtan(tmp_path):
    reg = get_registry()
    torch.manual_seed(0)
    bb = reg.get("backbone", "timm").build({"name": "test_resnet"})
    strides = [t.stride for t in bb.feature_info]
    assert strides == [2, 4, 8, 16, 32]
    assert [t.pool_after for t in bb.feature_info] == [True, True, True, True, False]
    assert bb.out_channels == bb.feature_info[-1].channels and bb.out_stride == 32
    x = torch.randn(2, 3, 64, 64)
    final, taps = bb.forward_taps(x)
    assert all(g is f for g, f in taps) and final.shape[1] == bb.out_channels

    for att in ("split", "mtan"):
        net = build(att, backbone="timm", bb_params={"name": "test_resnet"}, tasks=timm_tasks())
        out = net(x)
        assert out["a"].shape == (2, 5) and out["b"].shape == (2, 3)
        assert torch.allclose(out["a"].exp().sum(1), torch.ones(2), atol=1e-5)


def test_timm_pretrained_loads_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    reg = get_registry()
    torch.manual_seed(0)
    src = reg.get("backbone", "timm").build({"name": "test_resnet"}).eval()
    path = tmp_path / "w.safetensors"
    weights = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    weights["fc.weight"] = torch.zeros(2, 2)  # a classifier key that features_only lacks: ignored
    save_file(weights, str(path))
    torch.manual_seed(1)
    dst = reg.get("backbone", "timm").build({"name": "test_resnet", "pretrained": str(path)}).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(src(x), dst(x))
    with pytest.raises(ConfigError, match=r"model\.backbone\.params\.pretrained"):
        reg.get("backbone", "timm").build({"name": "test_resnet", "pretrained": str(tmp_path / "missing.safetensors")})
    save_file({"conv1.0.weight": weights["conv1.0.weight"]}, str(tmp_path / "part.safetensors"))
    with pytest.raises(ConfigError, match="lacks"):
        reg.get("backbone", "timm").build({"name": "test_resnet", "pretrained": str(tmp_path / "part.safetensors")})


def test_timm_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.backbone\.params\.name"):
        get_registry().get("backbone", "timm").build({"name": "no_such_model_xyz"})
