"""The shipped Decathlon recipes follow the reference data protocol and say which network
and input they use; the table's baseline rows (Rebuffi et al.'s ResNet-26 at 64x64) each
have a recipe in that setting."""

from __future__ import annotations

import re

import pytest

from mtlkit.recipe.loader import builtin_recipes, load_recipe

DECATHLON = sorted(n for n in builtin_recipes() if n.startswith("decathlon/") or n == "mtan_decathlon")


def backbone_words(recipe) -> str:
    b = recipe.model.backbone
    if b.name == "wrn":
        return f"WRN-{b.params.get('depth', 28)}-{b.params.get('widen_factor', 4)}"
    return {"resnet26": "ResNet-26"}[b.name]


@pytest.mark.parametrize("name", DECATHLON)
def test_decathlon_recipe_uses_the_reference_protocol_and_names_its_setting(name):
    recipe = load_recipe(name).recipe
    crops = set()
    for task in recipe.tasks.values():
        assert task.data.name == "decathlon"
        assert task.data.params["augmentation"] == "reference", name
        assert task.data.params.get("pad", 0) == 0
        crops.add(task.data.params.get("crop", 72))
    assert len(crops) == 1
    crop = crops.pop()
    # the description states the architecture and the input the recipe really uses
    assert f"{backbone_words(recipe)} at {crop}x{crop} input" in recipe.description, recipe.description
    # Rebuffi et al.'s ResNet-26 is a 64x64 network; the MTAN WRN-28-4 takes 72x72 (72 -> 36 -> 18 -> 9)
    assert crop == (64 if recipe.model.backbone.name == "resnet26" else 72)


def test_the_tables_baseline_rows_have_a_resnet26_64px_recipe():
    setting = {}
    for name in DECATHLON:
        recipe = load_recipe(name).recipe
        if recipe.paper is None:
            continue
        crop = next(iter(recipe.tasks.values())).data.params.get("crop", 72)
        if recipe.model.backbone.name == "resnet26" and crop == 64:
            setting.setdefault(re.sub(r" \(.*\)$", "", recipe.paper.architecture), []).append(name)
    # Feature is missing: see docs/reproducing.md (the ResNet-26's per-domain BatchNorm)
    assert {"Scratch", "Finetune", "Res. Adapt."} <= set(setting), setting
