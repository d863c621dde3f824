"""A recipe and its Python twin give the same model: same parameters, same outputs."""

from __future__ import annotations

import torch

import mtlkit
from mtlkit.build import build_parts, parameter_counts
from mtlkit.recipe.loader import load_recipe


def test_recipe_and_python_twin_match():
    loaded = load_recipe("shapes", overrides=["model.backbone.params.widths=[4, 8]", "training.seed=7"])
    parts = build_parts(loaded.recipe, with_data=False)

    torch.manual_seed(7)
    twin = mtlkit.compose(
        backbone=("small_cnn", {"widths": [4, 8]}),
        attention="split",
        tasks={"shape": ("classification", {"num_classes": 4, "target": "shape"}),
               "colour": ("classification", {"num_classes": 4, "target": "colour"}),
               "size": ("classification", {"num_classes": 3, "target": "size"})},
    )
    assert parameter_counts(twin) == parameter_counts(parts.model)
    a, b = parts.model.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 16, 16)
    parts.model.eval(), twin.eval()
    out_a, out_b = parts.model(x), twin(x)
    assert all(torch.equal(out_a[t], out_b[t]) for t in out_a)
    # another seed gives other weights (the seed really is what makes them equal)
    torch.manual_seed(8)
    other = mtlkit.compose(backbone=("small_cnn", {"widths": [4, 8]}),
                           tasks={"shape": ("classification", {"num_classes": 4, "target": "shape"})})
    assert not torch.equal(other.state_dict()["backbone.first.0.0.weight"], a["backbone.first.0.0.weight"])


def test_task_subset_runs_only_those_heads():
    model = mtlkit.compose(backbone=("small_cnn", {"widths": [4]}),
                           tasks={"a": ("classification", {"num_classes": 2}),
                                  "b": ("classification", {"num_classes": 5})})
    out = model(torch.randn(1, 3, 8, 8), tasks=["b"])
    assert list(out) == ["b"] and out["b"].shape == (1, 5)
    # heads apply log-softmax: probabilities sum to one
    assert torch.allclose(out["b"].exp().sum(1), torch.ones(1))


def test_stand_in_task_docstring_example_composes():
    """The example in StandInTask's docstring runs as written."""
    import re

    import mtlkit.testing

    doc = mtlkit.testing.StandInTask.__doc__
    code = re.search(r"::\n\n(.*?)\n\n", doc, re.S).group(1)
    scope = {"mtlkit": mtlkit, "StandInTask": mtlkit.testing.StandInTask}
    exec("\n".join(line.strip() for line in code.splitlines()), scope)
    model = scope["model"]
    assert model(torch.randn(1, 3, 32, 32))["seg"].shape == (1, 13, 32, 32)
