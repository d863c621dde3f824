"""``mtlkit predict`` and what already lies in ``--out``: an output file that exists is refused
(one line naming the first and the count, exit 2, every file byte for byte as it was, no new
file) unless ``--overwrite``, which replaces them; an input is never an output. And ``.npy``
inputs that are no .npy file, hold Python objects or hold NaN/inf each get their own line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from mtlkit.cli import main
from mtlkit.testing import TINY_CLASSIFICATION_RECIPE
from test_bad_input_outputs import refused

USER = b"the user's own file, not a prediction\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny classification run: predict writes NAME.safetensors, NAME.png and NAME.top5.json."""
    base = tmp_path_factory.mktemp("cls")
    (base / "tiny.toml").write_text(TINY_CLASSIFICATION_RECIPE)
    assert main(["run", str(base / "tiny.toml"), "--quiet", "--run-dir", str(base / "run")]) == 0
    return base / "run"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "in").mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    image.save("photos/cat.jpg")
    image.save("in/dog.png")
    return tmp_path


# -- outputs that already exist ------------------------------------------------------------------
def test_an_existing_output_is_refused_and_nothing_is_written(run, work, capsys):
    (work / "photos" / "cat.png").write_bytes(USER)  # the user's picture, named as cat.jpg's panel
    line = refused(capsys, ["predict", str(run), "photos/cat.jpg", "in/dog.png", "--out", "photos"],
                   "photos/cat.png", "1 output file already exists", "--overwrite", folder=work)
    assert line.startswith("error: photos/cat.png: "), line
    assert sorted(p.name for p in (work / "photos").iterdir()) == ["cat.jpg", "cat.png"]
    assert (work / "photos" / "cat.png").read_bytes() == USER


def test_every_kind_of_output_counts_and_the_first_is_named(run, work, capsys):
    out = work / "out"
    out.mkdir()
    for name in ("dog.top5.json", "cat.png", "cat.safetensors"):
        (out / name).write_bytes(USER)
    line = refused(capsys, ["predict", str(run), "photos/cat.jpg", "in/dog.png", "--out", "out"],
                   "out/cat.safetensors", "3 output files already exist", folder=work)
    assert line.startswith("error: out/cat.safetensors: "), line  # inputs in order, outputs in writing order
    (out / "cat.png").unlink()
    (out / "cat.safetensors").unlink()
    refused(capsys, ["predict", str(run), "photos/cat.jpg", "in/dog.png", "--out", "out"],
            "out/dog.top5.json", "1 output file already exists", folder=work)


def test_overwrite_replaces_the_existing_outputs(run, work, capsys):
    (work / "photos" / "cat.png").write_bytes(USER)
    (work / "photos" / "cat.top5.json").write_bytes(USER)
    jpg = (work / "photos" / "cat.jpg").read_bytes()
    assert main(["predict", str(run), "photos/cat.jpg", "--out", "photos", "--overwrite"]) == 0
    assert sorted(p.name for p in (work / "photos").iterdir()) == [
        "cat.jpg", "cat.png", "cat.safetensors", "cat.top5.json"]
    assert (work / "photos" / "cat.jpg").read_bytes() == jpg  # the input is untouched
    assert Image.open(work / "photos" / "cat.png").size[0] > 8  # now the panel
    top = json.loads((work / "photos" / "cat.top5.json").read_text())["shape"]
    scores = load_file(str(work / "photos" / "cat.safetensors"))["shape"]
    assert [c["class"] for c in top] == scores.argsort(descending=True).tolist()
    # and a second run over the same folder: refused without the flag, replaced with it
    refused(capsys, ["predict", str(run), "photos/cat.jpg", "--out", "photos"], "photos/cat.safetensors",
            "3 output files already exist", folder=work)
    assert main(["predict", str(run), "photos/cat.jpg", "--out", "photos", "--overwrite"]) == 0


def test_overwrite_never_replaces_an_input(run, work, capsys):
    refused(capsys, ["predict", str(run), "in/dog.png", "--out", "in", "--overwrite"],
            "in/dog.png", "overwrite this input", folder=work)


def test_overwrite_never_replaces_a_folder_nor_applies_to_a_split(run, work, capsys):
    (work / "photos" / "cat.png").mkdir()  # no file can take a folder's place
    (work / "photos" / "cat.png" / "keep.txt").write_bytes(USER)
    refused(capsys, ["predict", str(run), "photos/cat.jpg", "--out", "photos", "--overwrite"],
            "photos/cat.png", "folder", folder=work)
    refused(capsys, ["predict", str(run), "--split", "val", "--out", "photos", "--overwrite"],
            "--overwrite", "--split", folder=work)


# -- .npy inputs ---------------------------------------------------------------------------------
def _npy(capsys, run: Path, work: Path, name: str, *needles: str) -> str:
    line = refused(capsys, ["predict", str(run), name, "--out", "out"], name, *needles, folder=work)
    assert not (work / "out").exists()
    return line


@pytest.mark.parametrize("content", [b"hello", b"", b"PK\x03\x04 a zip, as .npz files are"])
def test_a_file_that_is_not_npy_says_so(run, work, capsys, content):
    (work / "x.npy").write_bytes(content)
    line = _npy(capsys, run, work, "x.npy", "x.npy: not a NumPy .npy file (")
    assert "pickle" not in line.lower(), line  # it is no pickle, and loading one is not the advice


def test_an_object_array_is_refused_as_python_objects(run, work, capsys):
    np.save(work / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    line = _npy(capsys, run, work, "obj.npy", "Python objects", "safety")
    assert "allow_pickle" not in line, line


def test_a_damaged_npy_is_one_line(run, work, capsys):
    np.save(work / "cut.npy", np.full((8, 8, 3), 0.5, np.float32))
    data = (work / "cut.npy").read_bytes()
    (work / "cut.npy").write_bytes(data[: len(data) // 2])
    _npy(capsys, run, work, "cut.npy", "cannot read as .npy")


def test_nan_and_inf_are_named_and_counted(run, work, capsys):
    a = np.full((8, 8, 3), 0.5, np.float32)
    a[0, 0] = np.nan  # 3 NaN (one pixel, three channels)
    a[1, 1, 0] = np.inf
    np.save(work / "nan.npy", a)
    _npy(capsys, run, work, "nan.npy", "3 NaN", "1 inf", "among its 192 float32")
    b = np.full((8, 8), 0.5, np.float64)
    b[2, 2] = -np.inf
    np.save(work / "inf.npy", b)
    line = _npy(capsys, run, work, "inf.npy", "1 inf", "among its 64 float64")  # counted in the file, not per channel
    assert "NaN" not in line, line
