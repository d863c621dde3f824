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
    assert {"Scratch", "Finetune", "Feature", "Res. Adapt."} <= set(setting), setting


def test_feature_resnet26_trains_only_the_heads_on_a_frozen_shared_trunk():
    import torch

    from mtlkit.build import build_model
    from mtlkit.domains import freeze_shared
    from mtlkit.engine.bn_stats import domain_bn_layers, shared_batchnorms

    recipe = load_recipe("decathlon/feature_resnet26", synthetic=True).recipe
    assert recipe.model.freeze_shared and recipe.model.backbone.params["domain_bn"] is False
    model, _ = build_model(recipe)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert shared_batchnorms(model) == bns  # one BatchNorm per layer, shared by the ten domains
    freeze_shared(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("heads.")}
    # the frozen trunk's statistics stay the source network's: none recomputed per domain
    assert domain_bn_layers(model, recipe.training, dict.fromkeys(recipe.tasks)) == []
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(2, 3, 32, 32), tasks=["svhn"])
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("synthetic", [False, True])
def test_the_resnet26_source_run_fits_finetune_and_feature(synthetic):
    import torch

    from mtlkit.build import build_model

    def backbone_shapes(name):
        with torch.device("meta"):
            model, _ = build_model(load_recipe(name, synthetic=synthetic).recipe)
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("backbone.")}

    source = backbone_shapes("decathlon/imagenet12_resnet26")
    for name in ("decathlon/finetune_resnet26", "decathlon/feature_resnet26"):
        assert load_recipe(name).recipe.model.init_from.path == "runs/decathlon_imagenet12_resnet26"
        assert backbone_shapes(name) == source, name  # init_from's "backbone.*" loads every tensor


@pytest.mark.parametrize("name", ["mtan_decathlon", "decathlon/mtan"])
def test_mtan_decathlon_follows_the_reference_protocol(name):
    # decathlon.md, "The reference protocol": 300 epochs over all ten domains with SGD 0.1
    # (Nesterov 0.9, wd 5e-5, StepLR(50, 0.5)), then 100 over the nine other than imagenet12 with
    # a fresh SGD at 0.01 and StepLR(50, 0.5); shared BatchNorm gets each domain's statistics.
    from mtlkit.engine.stages import Stages

    recipe = load_recipe(name).recipe
    opt, sched, tr = recipe.optimizer, recipe.schedule, recipe.training
    assert (opt.name, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == ("sgd", 0.1, 0.9, True, 5e-5)
    assert (sched.name, sched.step_size, sched.gamma) == ("step", 50, 0.5)
    assert tr.batch_size == 128 and tr.domain_order == "sequential" and tr.domain_bn_stats
    assert recipe.model.backbone.params.get("domain_bn", False) is False  # the reference shares BatchNorm
    first, second = tr.stages
    assert (first.epochs, first.domains, first.optimizer, first.schedule) == (300, None, None, None)
    assert second.epochs == 100 and set(second.domains) == set(recipe.tasks) - {"imagenet12"}
    o2, s2 = second.optimizer, second.schedule
    assert (o2.name, o2.lr, o2.momentum, o2.nesterov, o2.weight_decay) == ("sgd", 0.01, 0.9, True, 5e-5)
    assert (s2.name, s2.step_size, s2.gamma) == ("step", 50, 0.5)
    assert tr.epochs == 400
    stages = Stages(tr, opt, sched, dict.fromkeys(recipe.tasks))
    lr = {e: stages.optimizers[stages.optimizer_stage(e)].lr * stages.lr_factor(e)
          for e in (0, 299, 300, 349, 350, 399)}
    assert lr == pytest.approx({0: 0.1, 299: 0.1 * 0.5 ** 5, 300: 0.01, 349: 0.01, 350: 0.005, 399: 0.005})
    assert stages.optimizer_stage(299) == 0 and stages.optimizer_stage(300) == 1  # fresh at epoch 301
