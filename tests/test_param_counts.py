"""Full-size parameter counts against the reference implementation's (mtan-facts.md).

Models are built on the meta device (same modules and shapes, no memory, no init cost),
never run. Where our count differs from the reference's, the difference is spelled out and
asserted exactly:

- ``LOGSIGMA``: the reference keeps the uncertainty weighting's log-variances (one per
  task) inside every multi-task model, so its multi-task counts include K extra scalars.
  Here they belong to the ``uncertainty`` weighting, not to the model.
- Cross-Stitch: the reference has one weight per source task per unit (4 encoder + 5
  decoder units x 3 = 27), shared by all target tasks; we use the original paper's K x K
  matrix per unit (9 x 9 = 81).
- Dense: the reference's shared decoder ends in 64 -> 64 -> 13 channels whose output no task
  reads (44,583 parameters that never act; we drop that stage). Its task networks' top
  decoder stage is 128 -> 128 -> 64, and so is ours.
"""

from __future__ import annotations


import pytest
import torch

from mtlkit.plugin_manager import get_registry


from mtlkit.testing import StandInTask


NYU = {
    "segmentation": StandInTask("segmentation", "segmentation", 13, "log_softmax"),
    "depth": StandInTask("depth", "depth", 1),
    "normal": StandInTask("normal", "normal", 3, "l2_normalize"),
}
CITY = {
    "segmentation": StandInTask("segmentation", "segmentation", 7, "log_softmax"),
    "depth": StandInTask("depth", "depth", 1),
}
SEGNET_1 = 24_981_069  # one single-task SegNet for NYUv2 segmentation: the paper's "1"


def conv(cin, cout, k=3):
    return cin * cout * k * k + cout


def conv_bn(cin, cout):
    return conv(cin, cout) + 2 * cout


def count(attention, att_params=None, bb_params=None, tasks=NYU):
    reg = get_registry()
    heads = {t: (lambda c, t=t: reg.get("head", "dense_pred").build({}, in_channels=c, task=tasks[t]))
             for t in tasks}
    with torch.device("meta"):
        net = reg.get("attention", attention).build(
            att_params or {}, backbone=lambda: reg.get("backbone", "segnet").build(bb_params or {}),
            heads=heads, tasks=tasks)
    return sum(p.numel() for p in net.parameters())


def test_single_task_segnet_and_heads():
    reg = get_registry()
    with torch.device("meta"):
        trunk = sum(p.numel() for p in reg.get("backbone", "segnet").build({}).parameters())
    assert trunk == 24_943_296
    heads = {t: conv(64, 64) + conv(64, NYU[t].out_channels, 1) for t in NYU}
    assert heads == {"segmentation": 37_773, "depth": 36_993, "normal": 37_123}
    for t, n in {"segmentation": 24_981_069, "depth": 24_980_289, "normal": 24_980_419}.items():
        assert count("split", tasks={t: NYU[t]}) == n
    # the same count on a real (CPU) build, not only on meta tensors
    with torch.device("cpu"):
        assert sum(p.numel() for p in reg.get("backbone", "segnet").build({}).parameters()) == trunk


LOGSIGMA = 3  # reference multi-task models hold the 3 uncertainty log-variances


@pytest.mark.parametrize("name, attention, att_params, bb_params, reference, delta", [
    ("One Task", "single", {}, {}, 74_941_777, 0),
    ("STAN", "single", {"inner": "mtan"}, {}, 114_555_985, 0),
    ("Split Standard", "split", {}, {}, 25_055_188, -LOGSIGMA),
    ("Split Wide", "split", {}, {"widths": [64, 128, 256, 512, 1024]}, 43_934_164, -LOGSIGMA),
    ("Split Deep", "split", {}, {"deep": True}, 50_807_764, -LOGSIGMA),
    ("MTAN", "mtan", {}, {}, 44_229_076, -LOGSIGMA),
    # K x K units (9 x 9) instead of one weight per source task (9 x 3)
    ("Cross-Stitch", "cross_stitch", {}, {}, 74_941_807, -LOGSIGMA - 27 + 81),
    # no dead shared top stage (64->64->13 in the reference)
    ("Dense", "dense", {}, {}, 123_743_995, -LOGSIGMA - (conv_bn(64, 64) + conv_bn(64, 13))),
])
def test_nyuv2_architectures(name, attention, att_params, bb_params, reference, delta):
    assert count(attention, att_params, bb_params) == reference + delta, name


def test_the_documented_differences_in_numbers():
    # what the parametrised test above encodes, as plain numbers
    assert count("mtan") == 44_229_073
    assert count("cross_stitch") == 74_941_858 == 74_941_777 + 81
    dead_shared_top = conv_bn(64, 64) + conv_bn(64, 13)
    assert dead_shared_top == 44_583
    assert count("dense") == 123_743_995 - 3 - 44_583 == 123_699_409


def test_mtan_parts_match_the_reference():
    # shared f: encoder 64->128, 128->256, 256->512, 512->512, 512->512; decoder 64->64,
    # 128->64, 256->128, 512->256, 512->512 (Conv3x3-BN-ReLU)
    enc_f = sum(conv_bn(i, o) for i, o in [(64, 128), (128, 256), (256, 512), (512, 512), (512, 512)])
    dec_f = sum(conv_bn(i, o) for i, o in [(64, 64), (128, 64), (256, 128), (512, 256), (512, 512)])
    assert (enc_f, dec_f) == (6_272_640, 3_947_520)

    def att(i, m, o):
        return conv(i, m, 1) + 2 * m + conv(m, o, 1) + 2 * o

    enc_a = att(64, 64, 64) + att(256, 128, 128) + att(512, 256, 256) + 2 * att(1024, 512, 512)
    dec_a = att(1024, 512, 512) + att(768, 256, 256) + att(384, 128, 128) + att(192, 64, 64) + att(128, 64, 64)
    # the facts' 1,835,648 + 1,148,928 is the attention of ONE task (x 3 tasks in the total)
    assert (enc_a, dec_a) == (1_835_648, 1_148_928)
    heads = 37_773 + 36_993 + 37_123
    assert count("mtan") == 24_943_296 + enc_f + dec_f + 3 * (enc_a + dec_a) + heads


def test_cityscapes_mtan():
    # 41,206,986 in the facts counts the 2 log-variances of the uncertainty weighting
    assert count("mtan", tasks=CITY) == 41_206_986 - 2
    assert count("split", tasks={"segmentation": CITY["segmentation"]}) == 24_980_679


@pytest.mark.parametrize("attention, att_params, bb_params, ratio", [
    ("single", {}, {}, 3.000), ("single", {"inner": "mtan"}, {}, 4.586),
    ("split", {}, {"widths": [64, 128, 256, 512, 1024]}, 1.759), ("split", {}, {"deep": True}, 2.034),
    ("mtan", {}, {}, 1.771), ("cross_stitch", {}, {}, 3.000), ("dense", {}, {}, 4.952),
])
def test_ratios_to_one_segnet(attention, att_params, bb_params, ratio):
    assert round(count(attention, att_params, bb_params) / SEGNET_1, 3) == ratio
