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
metrics.shape = { accuracy = 12.34 }
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    (base / "tiny.toml").write_text(GOOD + PAPER)
    assert main(["run", str(base / "tiny.toml"), "--quiet", "--run-dir", str(base / "run")]) == 0
    return base / "run"


def test_compare_prints_the_papers_numbers_next_to_the_runs(finished, tmp_path, capsys):
    assert main(["compare", str(finished), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "12.34" in out and "(paper" in out
    header, run_row, paper_row = (tmp_path / "t.csv").read_text().splitlines()
    cols = header.split(",")
    paper = dict(zip(cols, paper_row.split(",")))
    assert paper["run"] == "run (paper; per_image_2019)"
    assert paper["shape/accuracy"] == "12.34" and paper["#P"] == "1.500" and paper["evals"] == "-"
    assert paper["architecture"] == "Tiny CNN"
    assert dict(zip(cols, run_row.split(",")))["shape/accuracy"] != "12.34"


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
                                               ("decathlon/series_adapters", 2118)])
def test_quoted_decathlon_accuracies_give_the_tables_score(name, table_score):
    # the paper's Score column, from its rounded accuracies: within a few points
    from mtlkit.plugins.decathlon.score import decathlon_score

    paper = load_recipe(name).recipe.paper
    assert paper.protocol == "test_server"
    acc = {t: v["accuracy"] for t, v in paper.metrics.items()}
    assert decathlon_score(acc, kind="accuracy") == pytest.approx(table_score, abs=3)
