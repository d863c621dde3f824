"""The Decathlon score (decathlon.md) and the test-server submission zip."""

from __future__ import annotations

import json
import zipfile

import pytest

from mtlkit.errors import ConfigError, DataError
from mtlkit.plugins.decathlon.domains import DOMAINS, TEST_SIZES, default_category_offsets
from mtlkit.plugins.decathlon.score import BASELINE_ACCURACY, decathlon_score, domain_score, domain_scores
from mtlkit.plugins.decathlon.submission import write_submission


# decathlon.md's "Domains (10)" sentence as written there: test split size (classes).
REFERENCE_DOMAINS = ("aircraft 3333 (100), cifar100 10000 (100), daimlerpedcls 19600 (2), dtd 1880 (47), "
                     "gtsrb 12630 (43), imagenet12 48238 (1000), omniglot 8115 (1623), svhn 26032 (10), "
                     "ucf101 3783 (101), vgg-flowers 6149 (102)")
# decathlon.md's baseline top-1 accuracies (the paper's "Finetune" row), in its own order.
REFERENCE_BASELINE = ("imagenet12 59.87, aircraft 60.34, cifar100 82.12, daimlerpedcls 92.82, dtd 55.53, "
                      "gtsrb 97.53, vgg-flowers 81.41, omniglot 87.69, svhn 96.55, ucf101 51.20")


def test_domains_class_counts_and_test_sizes_are_the_references():
    assert list(DOMAINS) == ["aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "imagenet12",
                             "omniglot", "svhn", "ucf101", "vgg-flowers"]
    parsed = [item.split() for item in REFERENCE_DOMAINS.split(", ")]
    assert DOMAINS == {name: int(classes.strip("()")) for name, _, classes in parsed}
    assert TEST_SIZES == {name: int(size) for name, size, _ in parsed}
    assert sum(DOMAINS.values()) == 3128
    offsets = default_category_offsets()
    assert offsets["aircraft"] == 10000001 and offsets["vgg-flowers"] == 100000001


def test_baseline_accuracies_are_the_references():
    assert BASELINE_ACCURACY == {name: float(acc) for name, acc in (i.split() for i in REFERENCE_BASELINE.split(", "))}


def test_baseline_scores_250_per_domain_and_2500_in_all():
    scores = domain_scores(BASELINE_ACCURACY)
    assert all(s == pytest.approx(250.0, abs=1e-9) for s in scores.values())
    assert decathlon_score(BASELINE_ACCURACY) == pytest.approx(2500.0, abs=1e-9)


def test_perfect_model_scores_10000_and_bad_domains_score_zero():
    assert decathlon_score({d: 100.0 for d in DOMAINS}) == pytest.approx(10000.0)
    assert decathlon_score({d: 0.0 for d in DOMAINS}, kind="error") == pytest.approx(10000.0)
    # error at or above twice the baseline error scores 0 (max(0, .))
    assert domain_score("svhn", 1.0 - 2 * (1 - 0.9655), kind="error") == pytest.approx(0.0, abs=1e-9)
    assert domain_score("svhn", 50.0) == 0.0


def test_one_value_by_hand():
    # cifar100 at 90 %: E = 0.10, E_base = 0.1788, Emax = 0.3576,
    # alpha = 1000 / 0.3576^2 = 7819.84..., S = 7819.84 * (0.3576 - 0.10)^2 = 518.9156
    assert domain_score("cifar100", 90.0) == pytest.approx(518.9156, abs=1e-3)
    assert domain_score("cifar100", 0.10, kind="error") == pytest.approx(518.9156, abs=1e-3)


def test_paper_table_rows_reproduce_their_published_scores():
    # Table rows (paper section 4.2) from the rounded accuracies; published: 2941, 1625, 544, 3398.
    order = ["imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "vgg-flowers",
             "omniglot", "svhn", "ucf101"]
    rows = {
        2941: [63.90, 61.81, 81.59, 91.63, 56.44, 98.80, 81.04, 89.83, 96.88, 50.63],
        1625: [59.87, 57.10, 75.73, 91.20, 37.77, 96.55, 56.3, 88.74, 96.63, 43.27],
        544: [59.67, 23.31, 63.11, 80.33, 45.37, 68.16, 73.69, 58.79, 43.54, 26.8],
        3398: [60.32, 66.04, 81.86, 94.23, 57.82, 99.24, 85.74, 89.25, 96.62, 52.50],
    }
    for published, accs in rows.items():
        assert decathlon_score(dict(zip(order, accs))) == pytest.approx(published, abs=3)


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'cifar100'"):
        decathlon_score({"cifar10": 50.0})
    with pytest.raises(ConfigError, match="percentage"):
        decathlon_score({"svhn": 0.97 * 1000})
    with pytest.raises(ConfigError, match="fraction"):
        decathlon_score({"svhn": 3.0}, kind="error")


def test_write_submission_round_trip(tmp_path):
    out = tmp_path / "sub" / "results.zip"
    preds = {"aircraft": [(10000001, 0), (10000002, 99)], "svhn": [(80000005, 7)]}
    write_submission(preds, default_category_offsets(), out)
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["results.json"]
        entries = json.loads(zf.read("results.json"))
    assert entries == [
        {"image_id": 10000001, "category_id": 10000001},
        {"image_id": 10000002, "category_id": 10000100},
        {"image_id": 80000005, "category_id": 80000008},
    ]
    # rewriting replaces the file atomically and leaves no temp files behind
    write_submission({"svhn": [(1, 2)]}, {"svhn": 500}, out)
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("results.json")) == [{"image_id": 1, "category_id": 502}]
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.zip"]


def test_write_submission_refuses_bad_predictions(tmp_path):
    out = tmp_path / "results.zip"
    with pytest.raises(ConfigError, match="no category offset for domain 'svhm'"):
        write_submission({"svhm": [(1, 0)]}, default_category_offsets(), out)
    with pytest.raises(DataError, match="outside domain 'svhn'"):
        write_submission({"svhn": [(1, 10)]}, None, out)
    with pytest.raises(DataError, match="predicted twice"):
        write_submission({"svhn": [(1, 1), (1, 2)]}, None, out)
    assert not out.exists()


def test_coverage_gaps_name_missing_domains_and_short_test_splits():
    from mtlkit.plugins.decathlon.submission import coverage_gaps

    assert coverage_gaps(dict(TEST_SIZES)) == []  # all ten domains, every test image
    counts = {d: n for d, n in TEST_SIZES.items() if d != "dtd"}
    counts["svhn"] -= 1
    assert coverage_gaps(counts) == ["no predictions for 1 of the ten domains (dtd): the server scores them 0",
                                     "svhn: 26031 predictions, the release's test split has 26032 images"]
