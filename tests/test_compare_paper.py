"""`mtlkit compare` prints the numbers a recipe's [paper] block quotes next to the run's,
with the protocol they were measured under; every shipped recipe that quotes numbers says
which protocol they used."""

from __future__ import annotations

import pytest
from test_cli_bad_input import GOOD

from mtlkit.cli import main
from mtlkit.recipe.loader import builtin_recipes, load_recipe

PAPER = """
[paper]
architecture = "Tiny CNN"
params_ratio = 1.5
protocol = "per_image_2019"
weighting = "equal"
metrics.shape = { accuracy = 12.34 }
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    (base / "tiny.toml").write_text(GOOD + PAPER)
    # trained with another weighting than the one behind the quoted numbers
    assert main(["run", str(base / "tiny.toml"), "--set", "weighting.name='dwa'", "--quiet",
                 "--run-dir", str(base / "run")]) == 0
    return base / "run"


def test_compare_prints_the_papers_numbers_next_to_the_runs(finished, tmp_path, capsys):
    assert main(["compare", str(finished), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "12.34" in out and "(paper" in out
    assert "the recipe's [paper] block quotes" in " ".join(out.split())  # not eaten as rich markup
    header, run_row, paper_row = (tmp_path / "t.csv").read_text().splitlines()
    cols = header.split(",")
    paper = dict(zip(cols, paper_row.split(",")))
    assert paper["run"] == "run (paper; per_image_2019)"
    assert paper["shape/accuracy"] == "12.34" and paper["#P"] == "1.500" and paper["evals"] == "-"
    assert paper["architecture"] == "Tiny CNN"
    run = dict(zip(cols, run_row.split(",")))
    assert run["shape/accuracy"] != "12.34"
    assert (run["weighting"], paper["weighting"]) == ("dwa", "equal")  # each row names its own


def test_quoted_metrics_must_name_their_weighting(tmp_path):
    from mtlkit.errors import ConfigError

    path = tmp_path / "r.toml"
    path.write_text(GOOD + PAPER.replace('weighting = "equal"\n', ""))
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert str(exc.value).count("\n") == 0 and str(path) in str(exc.value)
    assert "[paper]" in str(exc.value) and "the weighting the quoted metrics were trained with" in str(exc.value)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_recipes_quoting_numbers_name_their_protocol(name):
    paper = load_recipe(name).recipe.paper
    if paper is None or not paper.metrics:
        return
    if isinstance(paper.protocol, dict):
        assert set(paper.metrics) <= set(paper.protocol), name
    else:
        assert paper.protocol, name
    if name.startswith("nyuv2/"):  # the MTAN paper's NYUv2 numbers: the 2019 code's per-image mIoU
        assert paper.protocol["segmentation"] == "per_image_2019"


@pytest.mark.parametrize("name, table_score", [("decathlon/mtan", 2941), ("mtan_decathlon", 2941),
                                               ("decathlon/scratch_resnet26", 1625),
                                               ("decathlon/series_adapters", 2118),
                                               ("decathlon/feature_resnet26", 544)])
def test_quoted_decathlon_accuracies_give_the_tables_score(name, table_score):
    # the paper's Score column, from its rounded accuracies: within a few points
    from mtlkit.plugins.decathlon.score import decathlon_score

    paper = load_recipe(name).recipe.paper
    assert paper.protocol == "test_server"
    acc = {t: v["accuracy"] for t, v in paper.metrics.items()}
    assert decathlon_score(acc, kind="accuracy") == pytest.approx(table_score, abs=3)


@pytest.mark.parametrize("name", sorted(n for n in builtin_recipes() if n.split("/")[0] in ("nyuv2", "cityscapes")))
def test_the_papers_protocol_is_one_the_recipes_tasks_run_under_when_configured(name):
    from mtlkit.build import build_model
    from mtlkit.plugin_manager import get_registry
    from mtlkit.recipe.paper import paper_protocols, protocol_choices

    protocols = paper_protocols(load_recipe(name).recipe)
    assert protocols  # these recipes quote numbers whose protocol is a task's metric rule
    overrides = []
    for task, protocol in protocols.items():
        ref = load_recipe(name).recipe.tasks[task]
        assert protocol in protocol_choices(get_registry().get("task", ref.name).params)
        overrides.append(f"tasks.{task}.params.protocol='{protocol}'")
    # the --set docs/reproducing.md gives: each task then evaluates under the paper's protocol
    configured = load_recipe(name, overrides=overrides).recipe
    import torch

    with torch.device("meta"):
        _, tasks = build_model(configured)
    assert {t: tasks[t].protocol for t in protocols} == protocols


@pytest.mark.parametrize("protocol, message", [
    ('{ shape = "per_image_2019", colour = "exact" }', "[paper] protocol: 'colour' is not a task"),
    ('{ segmentation = "per_image" }', "[paper] protocol: 'per_image' for task 'segmentation' is not a protocol "
                                       "its plugin 'segmentation' offers, did you mean 'per_image_2019'?"),
])
def test_a_paper_protocol_its_task_cannot_run_under_is_one_line(tmp_path, protocol, message):
    from tiny_recipes import TINY_SEGMENTATION_RECIPE

    from mtlkit.errors import ConfigError

    base = GOOD if "shape" in protocol else TINY_SEGMENTATION_RECIPE
    path = tmp_path / "r.toml"
    path.write_text(base + f"\n[paper]\nprotocol = {protocol}\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert str(exc.value).count("\n") == 0 and message in str(exc.value) and str(path) in str(exc.value)
