"""Every registered built-in component, in its tiny variant, on CPU: one parametrised test
per kind, driven by the registry (a new plugin is picked up without editing this file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlkit.build import build_component, compose
from mtlkit.recipe.schema import ComponentRef
from mtlkit.contracts import Backbone, MetricState, MultiTaskNetwork, Task, Weighting
from mtlkit.discovery import builtin_plugin_modules
from mtlkit.plugin_manager import get_plugin_manager, get_registry

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = [c for c in get_registry().list() if c.plugin.startswith("mtlkit.plugins.")]


def ids(kind):
    return [c for c in BUILTIN if c.kind == kind]


def tiny(c):
    return {} if c.tiny is None else c.tiny


def test_every_builtin_plugin_is_registered():
    pm = get_plugin_manager()
    assert not pm.failed_plugins
    assert all(pm.sources.get(m.__name__) == "builtin" for m in builtin_plugin_modules())


@pytest.mark.parametrize("c", ids("backbone"), ids=lambda c: c.name)
def test_backbone_feature_contract(c):
    torch.manual_seed(0)
    bb = build_component("backbone", ComponentRef(name=c.name, params=tiny(c)), "model.backbone",
                         task_names=["a", "b"])
    assert isinstance(bb, Backbone)
    x = torch.randn(2, 3, 32, 32)
    final, taps = bb.forward_taps(x)
    assert final.shape[:2] == (2, bb.out_channels)
    assert final.shape[-1] == 32 // bb.out_stride
    assert len(taps) == len(bb.feature_info) > 0
    for info, (gate, feature) in zip(bb.feature_info, taps):
        assert gate.shape[1] == info.gate_channels and feature.shape[1] == info.channels
        assert feature.shape[-1] == 32 // info.stride, info
    assert torch.equal(bb(x), final)


@pytest.mark.parametrize("c", ids("head"), ids=lambda c: c.name)
def test_head_gives_task_channels(c):
    class Stand(Task):
        name, target, out_channels, output_activation = "t", "t", 5, "identity"

    head = c.build(tiny(c), in_channels=8, task=Stand())
    out = head(torch.randn(2, 8, 4, 4))
    assert out.shape[:2] == (2, 5)


@pytest.mark.parametrize("c", ids("attention"), ids=lambda c: c.name)
def test_attention_on_tiny_segnet(c):
    """Every attention plugin composes with a tiny SegNet (taps + staged execution) and
    runs exactly the requested tasks."""
    torch.manual_seed(0)
    model = compose(backbone=("segnet", {"width": 0.0625}), attention=(c.name, tiny(c)),
                    tasks={"seg": ("segmentation", {"num_classes": 3}), "depth": "depth"})
    assert isinstance(model, MultiTaskNetwork)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out["seg"].shape == (2, 3, 32, 32) and out["depth"].shape == (2, 1, 32, 32)
    assert list(model(x, tasks=["depth"])) == ["depth"]
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) not in shared for p in model.task_parameters("seg"))  # (One Task shares none)


@pytest.mark.parametrize("c", ids("weighting"), ids=lambda c: c.name)
def test_weighting_builds_and_combines(c):
    w = c.build(tiny(c), task_names=["a", "b"])
    assert isinstance(w, Weighting)
    losses = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    if w.requires_grads is None or type(w).combine_grads is Weighting.combine_grads:  # (owns its backward)
        total = w.combine(losses)
        assert total.dim() == 0 and torch.isfinite(total)
    else:
        update = w.combine_grads(torch.randn(2, 7), losses)
        assert update.shape == (7,)


@pytest.mark.parametrize("c", ids("task"), ids=lambda c: c.name)
def test_task_declares_its_outputs_and_metrics(c):
    task = c.build(tiny(c), name="t")
    assert isinstance(task, Task) and task.out_channels >= 1 and task.target
    state = task.metrics()
    assert isinstance(state, MetricState) and state.higher_is_better
    assert all(isinstance(v, torch.Tensor) for v in state.state.values())


@pytest.mark.parametrize("c", ids("dataset"), ids=lambda c: c.name)
def test_dataset_sample(c, tmp_path):
    # a data set that reads files writes a tiny copy of its published layout first
    params = c.tiny(tmp_path / c.name) if callable(c.tiny) else tiny(c)
    data = c.build(params, split="train")
    assert len(data) > 0
    sample = data[0]
    assert sample["image"].dim() == 3 and sample["image"].dtype == torch.float32


@pytest.mark.parametrize("attention", ids("attention"), ids=lambda c: c.name)
@pytest.mark.parametrize("backbone", ids("backbone"), ids=lambda c: c.name)
def test_attention_on_every_backbone(attention, backbone):
    """Every attention plugin on every backbone's tiny variant: it either runs, giving each
    task its output at the input's resolution (dense tasks upsample on strided encoders),
    or refuses at build time with one ConfigError naming the model section."""
    from mtlkit.errors import ConfigError

    torch.manual_seed(0)
    tasks = {"seg": ("segmentation", {"num_classes": 3}), "depth": "depth"}
    try:
        model = compose(backbone=(backbone.name, tiny(backbone)), attention=(attention.name, tiny(attention)),
                        tasks=tasks)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "model" in message, message
        # only attention that runs the backbone stage by stage may refuse; taps are enough for these
        assert attention.name not in ("split", "mtan", "single"), message
        return
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["seg"].shape == (2, 3, 64, 64) and out["depth"].shape == (2, 1, 64, 64)
    torch.testing.assert_close(out["seg"].exp().sum(1), torch.ones(2, 64, 64))  # log-probabilities
    assert list(model(x, tasks=["depth"])) == ["depth"]
