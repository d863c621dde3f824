"""Bad Decathlon input refused in one line naming the file (or folder) and what is wrong: an
image annotated twice, another domain's annotation file, unreadable files and folders,
JSON nested too deeply, non-finite or non-positive normalisation statistics."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from mtlkit.cli import main
from mtlkit.errors import DataError
from mtlkit.plugin_manager import get_registry
from mtlkit.plugins.decathlon import stats as decathlon_stats
from mtlkit.plugins.decathlon.domains import category_offset
from mtlkit.plugins.decathlon.mean_std import compute_mean_std
from mtlkit.plugins.decathlon.synthetic import write_decathlon_layout
from mtlkit.testing import TINY_CLASSIFICATION_RECIPE

DEEP = "[" * 200000 + "]" * 200000


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec_bad") / "decathlon-1.0"
    write_decathlon_layout(root, 3, 2, 1, image_size=32, seed=1, domains=["dtd", "svhn"])
    return root


@pytest.fixture
def root(release, tmp_path):
    return shutil.copytree(release, tmp_path / "copy")


def load(root, domain, split="train", **params):
    return get_registry().get("dataset", "decathlon").build({"root": str(root), "domain": domain, **params}, split=split)


def edit(path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


# ------------------------------------------------------------------------------ annotations
@pytest.mark.parametrize("other_class", [True, False])
def test_an_image_annotated_twice(root, other_class):
    path = root / "annotations" / "svhn_train.json"
    first = json.loads(path.read_text())["annotations"][0]
    again = {"id": 999, "image_id": first["image_id"], "category_id": first["category_id"] + other_class}
    edit(path, lambda raw: raw["annotations"].append(again))
    with pytest.raises(DataError, match=rf"svhn_train\.json: image id {first['image_id']} is annotated twice "
                                        r"\(annotations\[0\] and annotations\[3\]\)"):
        load(root, "svhn")


def test_an_annotation_file_of_another_domain(root):
    for split in ("train", "val"):  # dtd's files copied over svhn's: their images exist
        shutil.copy(root / "annotations" / f"dtd_{split}.json", root / "annotations" / f"svhn_{split}.json")
    with pytest.raises(DataError, match=r"svhn_train\.json: category ids start at 40000001, but domain 'svhn' "
                                        r"starts at 80000001 \(an annotation file of another domain\?\)"):
        load(root, "svhn")
    assert len(load(root, "dtd")) == 3 and category_offset("svhn") == 80000001  # the official offsets load


def test_more_categories_than_the_domain_has(root):
    path = root / "annotations" / "svhn_val.json"
    offset = category_offset("svhn")
    edit(path, lambda raw: raw.update(categories=[{"id": offset + c, "name": str(c)} for c in range(11)]))
    with pytest.raises(DataError, match=r"svhn_val\.json: 11 categories, more than domain 'svhn' has \(10\)"):
        load(root, "svhn", "val")


def test_annotation_and_stats_files_nested_too_deeply(root, tmp_path):
    (root / "annotations" / "svhn_val.json").write_text(DEEP)
    with pytest.raises(DataError, match=r"svhn_val\.json: not readable JSON \(nested too deeply\)"):
        load(root, "svhn", "val")
    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(DataError, match=r"deep\.json: not a readable JSON stats file \(nested too deeply\)"):
        load(root, "dtd", "val", stats_file=str(tmp_path / "deep.json"))


# ------------------------------------------------------------------------------ unreadable files and folders
# (monkeypatched: chmod 000 does not stop root, so a real chmod would not run everywhere)
def deny(monkeypatch, method, blocked):
    """Make ``Path.<method>`` raise PermissionError on ``blocked`` and everything under it."""
    real = getattr(pathlib.Path, method)

    def denied(self, *args, **kwargs):
        if self == blocked or blocked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, denied)


def test_unreadable_image_folder_in_the_official_layout(root, monkeypatch):
    deny(monkeypatch, "is_file", root / "data" / "svhn" / "train")
    with pytest.raises(DataError, match=r"svhn_train\.json: lists 'data/svhn/train/\d+\.jpg' but "
                                        r"\S+/svhn/train/\d+\.jpg: cannot be read \(Permission denied\)"):
        load(root, "svhn")
    deny(monkeypatch, "is_dir", root)
    with pytest.raises(DataError, match=rf"{root}: cannot be read \(Permission denied\)"):
        load(root, "svhn")


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "if"
    for split in ("train", "val"):
        for cls in ("0", "1"):
            (folder / "svhn" / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "svhn" / split / cls / "a.png")
    assert len(load(folder, "svhn", "val", layout="imagefolder", image_size=8, crop=8)) == 2
    return folder


@pytest.mark.parametrize("blocked", ["svhn/train", "svhn/val", "svhn/val/1"])
def test_unreadable_split_or_class_folder_in_the_imagefolder_layout(image_folder, monkeypatch, blocked):
    deny(monkeypatch, "iterdir", image_folder / blocked)
    with pytest.raises(DataError, match=rf"{image_folder / blocked}: cannot be read \(Permission denied\)"):
        load(image_folder, "svhn", "val", layout="imagefolder", image_size=8, crop=8)


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("field,value,need", [
    ("mean", float("nan"), "finite numbers"),
    ("mean", float("-inf"), "finite numbers"),
    ("std", float("inf"), "finite positive numbers"),
    ("std", float("nan"), "finite positive numbers"),
    ("std", 0, "finite positive numbers"),
    ("std", -0.2, "finite positive numbers"),
])
def test_non_finite_or_non_positive_stats(release, tmp_path, field, value, need):
    entry = {"mean": [0.5] * 3, "std": [0.25] * 3}
    entry[field][1] = value
    path = tmp_path / "st.json"
    path.write_text(json.dumps({"domains": {"svhn": entry}}))  # NaN / Infinity, as Python's json writes them
    message = rf"st\.json: domain 'svhn': '{field}' holds {value!r}; it must be {need}"
    with pytest.raises(DataError, match=message):
        load(release, "svhn", "val", stats_file=str(path))
    with pytest.raises(DataError, match=message.replace("st", "out", 1)):  # nor is such a file written
        decathlon_stats.write_stats({"svhn": entry}, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_stats_that_are_not_lists_of_numbers(tmp_path):
    path = tmp_path / "st.json"
    path.write_text(json.dumps({"domains": {"svhn": {"mean": "123", "std": [0.2] * 3}}}))
    with pytest.raises(DataError, match=r"st\.json: domain 'svhn' needs 'mean' and 'std' lists of numbers"):
        decathlon_stats.load_stats(path)
    path.write_text(json.dumps({"domains": {"svhn": {"mean": [0.5] * 3, "std": [0.2, True, 0.2]}}}))
    with pytest.raises(DataError, match=r"st\.json: domain 'svhn' needs .*\('std'"):
        decathlon_stats.load_stats(path)


def test_validate_refuses_a_nan_stats_file(release, tmp_path, capsys):
    path = tmp_path / "nan.json"
    path.write_text('{"domains": {"svhn": {"mean": [0.4, 0.4, 0.4], "std": [0.2, NaN, 0.2]}}}')
    recipe = TINY_CLASSIFICATION_RECIPE.replace(
        'name = "synthetic_classification"\nparams = { size = 8, num_train = 8, num_val = 4 }',
        f'name = "decathlon"\nparams = {{ root = "{release}", domain = "svhn", image_size = 32, crop = 32, '
        f'stats_file = "{path}" }}').replace('num_classes = 4, target = "shape"', "num_classes = 10")
    (tmp_path / "r.toml").write_text(recipe)
    assert main(["validate", str(tmp_path / "r.toml")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "nan.json: domain 'svhn': 'std' holds nan" in lines[0], lines


def test_compute_mean_std_refuses_images_without_variation(tmp_path):
    from PIL import Image

    for cls in ("0", "1"):
        (tmp_path / "svhn" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "svhn" / "train" / cls / "a.png")
    with pytest.raises(DataError, match=r"domain 'svhn': the train images do not vary in channel R \(std 0\)"):
        compute_mean_std(tmp_path, domains=["svhn"], layout="imagefolder", image_size=8)
