"""Bad input to predict, plot and compare, and damaged logs: each is one line on stderr naming
the file or argument, exit code 2, and nothing created, overwritten or half-written (an
input predict would overwrite, empty arrays, bad --images/--levels, log lines that are JSON
but not records, two outputs at one path, an output that cannot be written)."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlkit.cli import main
from test_cli_bad_input import one_line_error
from tiny_recipes import TINY_SEGMENTATION_RECIPE


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished run (1 epoch, one evaluation), shared read-only by the tests."""
    base = tmp_path_factory.mktemp("trained")
    (base / "tiny.toml").write_text(TINY_SEGMENTATION_RECIPE)
    assert main(["run", str(base / "tiny.toml"), "--quiet", "--run-dir", str(base / "run")]) == 0
    return base / "run"


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden temp files included) and its content."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args, *needles: str, folder: Path) -> str:
    """``mtlkit ARGS``: exit 2, one stderr line holding the needles, ``folder`` byte for byte as it was."""
    before = digest(folder)
    line = one_line_error(capsys, args, *needles)
    assert digest(folder) == before, "the command wrote, changed or removed files"
    return line


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- predict -----------------------------------------------------------------------------------
def test_predict_refuses_to_overwrite_an_input(trained, work, capsys):
    (work / "inplace").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save("inplace/img.png")
    refused(capsys, ["predict", str(trained), "inplace/img.png", "--out", "inplace"],
            "inplace/img.png", "overwrite", folder=work)
    # a second input of the same name would take its stem with -2, never another input's name
    (work / "b").mkdir()
    shutil.copy("inplace/img.png", "b/img.png")
    shutil.copy("inplace/img.png", "b/img-2.png")
    refused(capsys, ["predict", str(trained), "b/img.png", "inplace/img.png", "b/img-2.png", "--out", "b"],
            "b/img.png", "overwrite", folder=work)


@pytest.mark.parametrize("shape", [(3, 0, 32), (0, 0), (0, 5, 3)])
def test_predict_refuses_an_empty_array_and_creates_nothing(trained, work, capsys, shape):
    np.save("empty.npy", np.zeros(shape, np.float32))
    np.save("good.npy", np.full((32, 32, 3), 0.5, np.float32))
    refused(capsys, ["predict", str(trained), "good.npy", "empty.npy", "--out", "pout/sub"],
            "empty.npy", "empty", folder=work)
    assert not (work / "pout").exists()


def test_predict_failing_midway_removes_the_folder_it_made(trained, work, capsys, monkeypatch):
    import mtlkit.predict as predict
    from mtlkit.errors import DataError

    np.save("a.npy", np.full((32, 32, 3), 0.5, np.float32))
    np.save("b.npy", np.full((32, 32, 3), 0.25, np.float32))
    real, calls = predict.run_group, []

    def failing(run, group, image, tile=False):
        calls.append(1)
        if len(calls) > 1:
            raise DataError("b.npy: simulated failure")
        return real(run, group, image, tile=tile)

    monkeypatch.setattr(predict, "run_group", failing)
    refused(capsys, ["predict", str(trained), "a.npy", "b.npy", "--out", "made/out"], "b.npy", folder=work)
    assert not (work / "made").exists()


# -- plot arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [(["--images", "0"], "--images"), (["--images", "-1"], "--images"),
                                         (["--attention", "--levels", "a,b"], "--levels"),
                                         (["--attention", "--levels", ","], "--levels"),
                                         (["--attention", "--levels", "0,-3"], "--levels")])
def test_plot_arguments(trained, capsys, args, needle):
    refused(capsys, ["plot", str(trained), *args], needle, folder=trained)


# -- damaged logs ------------------------------------------------------------------------------
BAD_LINES = {
    "list": b"[1, 2]",
    "number": b"3",
    "metrics_not_a_mapping": b'{"type": "eval", "epoch": 1, "metrics": {"segmentation": [1, 2]}}',
    "eval_without_epoch": b'{"type": "eval", "metrics": {"segmentation": {"miou": 1.0}}}',
    "epoch_as_text": b'{"type": "epoch", "epoch": "one", "losses": {}}',
    "not_utf8": b'{"type": "step", "note": "\xff\xfe"}',
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_damaged_log_line_is_one_error_for_every_reader(trained, tmp_path, capsys, kind):
    run = shutil.copytree(trained, tmp_path / "run")
    log = run / "log.jsonl"
    lines = log.read_bytes().splitlines()
    log.write_bytes(b"\n".join(lines[:1] + [BAD_LINES[kind]] + lines[1:]) + b"\n")
    for args in (["compare", str(run)], ["plot", str(run)],
                 ["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"]):
        refused(capsys, args, f"{log}:2", folder=tmp_path)


def test_torn_last_line_is_still_dropped_on_resume(trained, tmp_path, capsys):
    from mtlkit.rundir import read_log

    run = shutil.copytree(trained, tmp_path / "run")
    good = read_log(run)
    with open(run / "log.jsonl", "ab") as fh:
        fh.write(b'{"type": "eval", "epo')
    assert read_log(run) == good
    assert main(["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"]) == 0, capsys.readouterr().err
    records = read_log(run)
    assert (run / "log.jsonl").read_bytes().endswith(b"\n")
    assert [r["epoch"] for r in records if r.get("type") == "eval"] == [1, 2]


# -- compare outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,needles", [
    (["--csv", "same.txt", "--markdown", "same.txt"], ("--markdown", "--csv", "same.txt")),
    (["--out", "t", "--markdown", "t.md"], ("--out", "--markdown", "t.md")),
    (["--csv", "/proc/mtlkit-no-such.csv", "--markdown", "ok.md"], ("/proc/mtlkit-no-such.csv", "cannot write")),
    (["--markdown", "ok.md", "--csv", "missing/t.csv"], ("missing/t.csv", "cannot write")),
    (["--markdown", "ok.md", "--csv", "."], (".", "folder")),
])
def test_compare_writes_all_outputs_or_none(trained, work, capsys, args, needles):
    (work / "same.txt").write_text("the user's notes")
    refused(capsys, ["compare", str(trained), *args], *needles, folder=work)


def test_compare_refuses_a_run_folders_own_file(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    refused(capsys, ["compare", str(run), "--csv", str(run / "log.jsonl")], "--csv", "log.jsonl", folder=tmp_path)


def test_compare_failing_on_the_last_file_writes_none(trained, work, capsys, monkeypatch):
    import mtlkit.cli.compare as compare

    real = compare.atomic_write_text

    def full_disk(path, text):
        if Path(path).name.startswith(".t.csv."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(compare, "atomic_write_text", full_disk)
    refused(capsys, ["compare", str(trained), "--markdown", "t.md", "--csv", "t.csv"], "t.csv", "No space",
            folder=work)
    monkeypatch.setattr(compare, "atomic_write_text", real)
    assert main(["compare", str(trained), "--out", "t"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["t.csv", "t.md"]


@pytest.mark.parametrize("out", [".", "..", "tables/", "existing"])
def test_an_out_prefix_that_names_a_folder_is_refused(trained, work, capsys, out):
    (work / "tables").mkdir()
    (work / "existing").mkdir()
    refused(capsys, ["compare", str(trained), "--out", out], f"--out {out}", "names a folder", folder=work)
    refused(capsys, ["sweep", str(trained / "recipe.toml"), "--grid", "training.seed=0,1", "--out", out,
                     "--dry-run"], f"--out {out}", "names a folder", folder=work)


def test_the_out_prefix_keeps_its_dots(trained, work, capsys):
    """--out t.v2 writes t.v2.md and t.v2.csv (a suffix is appended, never swapped in)."""
    assert main(["compare", str(trained), "--out", "t.v2"]) == 0
    assert main(["compare", str(trained), "--out", "u.md"]) == 0  # a given .md is the prefix's own
    assert sorted(p.name for p in work.iterdir() if p.is_file()) == ["t.v2.csv", "t.v2.md", "u.csv", "u.md"]
