"""Every shipped recipe validates, builds on the meta device (no memory, no data), and its
parameter count agrees with the paper's #P column where the recipe quotes it."""

from __future__ import annotations

import pytest
import torch

from mtlkit.build import build_model, params_ratio, params_unit
from mtlkit.recipe.loader import builtin_recipes, load_recipe

RECIPES = sorted(builtin_recipes())


def test_recipes_are_found():
    # the shipped families: quickstart, NYUv2, CityScapes and the Decathlon
    assert {"quickstart", "nyuv2/mtan", "cityscapes/mtan", "mtan_decathlon", "decathlon/series_adapters"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_builds_with_its_parameter_count(name):
    recipe = load_recipe(name).recipe
    with torch.device("meta"):
        model, tasks = build_model(recipe)
        total = sum(p.numel() for p in model.parameters())
        unit = params_unit(recipe, tasks)
        ratio = params_ratio(recipe, model, tasks)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert total > 0 and unit > 0
    paper = recipe.paper
    if paper is not None and paper.params_ratio is not None:
        # the paper rounds #P to 2-3 significant digits (STAN 4.586 is printed 4.56, Split
        # Deep 2.034 as 2): 2% covers that rounding and nothing more
        assert ratio == pytest.approx(paper.params_ratio, rel=0.02), (total, unit)
    # the synthetic stand-in of the same recipe builds as well (recipes that are synthetic
    # already, such as the quickstart, have none)
    if recipe.data is None or recipe.data.synthetic is not None:
        synthetic = load_recipe(name, synthetic=True).recipe
        with torch.device("meta"):
            build_model(synthetic)


def test_nyuv2_mtan_takes_the_plain_path_on_cpus_and_the_measured_one_on_cuda(monkeypatch):
    """The recipe's speed choices are "auto": on a CPU they resolve to the plain path (fp32,
    NCHW, eager, the per-task loop, no graph); on CUDA to what bench/gpu_bench.py measured
    fastest on an H200 (docs/performance.md): bf16, channels-last, inductor, batched branches,
    the step as one CUDA graph."""
    from mtlkit.engine.precision import resolve

    recipe = load_recipe("nyuv2/mtan").recipe
    cpu = resolve(recipe.training, torch.device("cpu"))
    assert (cpu.precision, cpu.channels_last, cpu.compile) == ("fp32", False, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = resolve(recipe.training, torch.device("cuda", 0))
    assert (cuda.precision, cuda.channels_last, cuda.compile, cuda.compile_mode) == ("bf16", True, True, "default")
    assert recipe.training.cuda_graph == "auto"
    # the batched branches under "auto" run on CUDA inputs only (the dispatch itself:
    # tests/test_mtan_fast_path.py); no recomputation by default
    with torch.device("meta"):
        model, _ = build_model(recipe)
    assert model.params.fast == "auto" and not model.params.memory_efficient
