"""The plugin-authoring guide's example plugin, loaded the three documented ways; each of
its six hooks registers a component that is then used in training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from mtlkit.plugin_manager import MtlkitPluginManager

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples"
HOOKS = ("register_backbones", "register_heads", "register_attention", "register_weightings",
         "register_tasks", "register_datasets")
COMPONENTS = {("backbone", "tiny_conv"), ("head", "pointwise"), ("attention", "gated"),
              ("weighting", "loss_share"), ("task", "regression"), ("dataset", "noise_images")}


def test_recipe_named_file_trains(fresh_pm, tmp_path):
    from mtlkit.build import build_parts
    from mtlkit.engine import Trainer
    from mtlkit.recipe.loader import load_recipe

    loaded = load_recipe(EXAMPLE / "example_recipe.toml")
    registry = fresh_pm.registry
    plugin = next(name for name, src in fresh_pm.sources.items() if src == "recipe")
    assert {(c.kind, c.name) for c in registry.list() if c.plugin == plugin} == COMPONENTS
    hooks = {h.name for h in fresh_pm.pm.get_hookcallers(fresh_pm.pm.get_plugin(plugin))}
    assert hooks == set(HOOKS)
    parts = build_parts(loaded.recipe)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    (tmp_path / "run").mkdir()
    trainer = Trainer(parts.model, parts.tasks, parts.train_data, parts.val_data, weighting=parts.weighting,
                      optimizer=loaded.recipe.optimizer, training=loaded.recipe.training, run_dir=tmp_path / "run",
                      quiet=True)
    metrics = trainer.fit()
    assert set(metrics) == {"brightness", "darkness"} and all("mse" in m for m in metrics.values())
    after = parts.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the example weighting's weights are K * L_k / sum(L): they sum to K
    assert abs(sum(parts.weighting.weights().values()) - 2.0) < 1e-5


def test_entry_point_and_python_registration(tmp_path, monkeypatch):
    dist = tmp_path / "example_mtlkit_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: example-mtlkit-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mtlkit]\nexample = example_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("example_plugin", None)
    pm = MtlkitPluginManager(load_entry_points=True)
    assert {(c.kind, c.name) for c in pm.registry.list() if c.plugin == "example"} == COMPONENTS

    spec = importlib.util.spec_from_file_location("example_plugin_py", EXAMPLE / "example_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pm2 = MtlkitPluginManager(load_entry_points=False)
    pm2.register(module, name="by_python")
    assert {(c.kind, c.name) for c in pm2.registry.list() if c.plugin == "by_python"} == COMPONENTS
