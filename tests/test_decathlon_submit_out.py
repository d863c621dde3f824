"""`mtlkit decathlon submit RUN --out PATH`: an --out that would destroy the run (one of the
run folder's own files, anything under its checkpoints/ folder, symlinks resolved), that is
a folder, whose parent is a file, or whose folder cannot be written, is one line on stderr
and exit code 2 before any prediction is computed, with the run folder byte-identical and
nothing written. An OSError while the zip is written is one line naming the path, and
leaves no partial file and no folder it created."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from mtlkit.cli import main
from mtlkit.plugins.decathlon import submission

SIZE = 16


def _task(domain: str, classes: int, root: Path) -> str:
    return (f'[tasks.{domain}]\nname = "classification"\nparams = {{ num_classes = {classes} }}\n'
            f'data = {{ name = "decathlon", params = {{ root = "{root.as_posix()}", domain = "{domain}", '
            f'image_size = {SIZE}, crop = {SIZE} }} }}\n')


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny two-domain run (small_cnn, 16 px, one epoch) on written synthetic data."""
    base = tmp_path_factory.mktemp("submit_out")
    data = base / "dec"
    assert main(["data", "synth-decathlon", str(data), "--n-train", "4", "--n-val", "2", "--n-test", "2",
                 "--image-size", str(SIZE)]) == 0
    recipe = base / "dec.toml"
    recipe.write_text('name = "dec"\n[model.backbone]\nname = "small_cnn"\nparams = { widths = [4, 8] }\n'
                      + _task("svhn", 10, data) + _task("dtd", 47, data)
                      + '[training]\nepochs = 1\nbatch_size = 4\ndevice = "cpu"\n')
    run = base / "run"
    assert main(["run", str(recipe), "--run-dir", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run (a test that fails may not spoil the others)."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


@pytest.fixture
def predicted(monkeypatch) -> list:
    """The calls of split_predictions (the costly part) made during the test."""
    calls: list = []
    real = submission.split_predictions

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(submission, "split_predictions", spy)
    return calls


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def _refused(run: Path, out: str | Path, capsys, predicted: list) -> str:
    """Submit to ``out``: exit 2, one stderr line naming ``out``, nothing predicted, the run
    folder unchanged. Returns the line."""
    capsys.readouterr()
    before = _snapshot(run)
    rc = main(["decathlon", "submit", str(run), "--out", str(out)])
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    assert predicted == []  # refused before any prediction
    assert _snapshot(run) == before
    return lines[0]


# -- the run folder's own files --------------------------------------------------------------
@pytest.mark.parametrize("name", ["recipe.toml", "results.json", "log.jsonl", "checkpoints/last.json",
                                  "checkpoints", "checkpoints/new.zip", "checkpoints/new/sub.zip",
                                  "curves.png", "."])
def test_an_out_that_is_the_runs_own_file_is_refused(run, name, capsys, predicted):
    line = _refused(run, run / name, capsys, predicted)
    assert "run folder" in line
    assert not (run / "checkpoints" / "new.zip").exists() and not (run / "checkpoints" / "new").exists()
    assert not (run / "curves.png").exists()


def test_the_runs_files_are_refused_through_symlinks_and_dotdot(run, tmp_path, capsys, predicted):
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    _refused(run, alias / "recipe.toml", capsys, predicted)
    _refused(run, alias / "checkpoints" / "last.json", capsys, predicted)
    _refused(run, run / "checkpoints" / ".." / "results.json", capsys, predicted)
    link = tmp_path / "sub.zip"
    link.symlink_to(run / "recipe.toml")
    _refused(run, link, capsys, predicted)
    assert link.is_symlink() and os.readlink(link) == str(run / "recipe.toml")


def test_a_relative_out_into_the_run_is_refused(run, capsys, predicted, monkeypatch):
    monkeypatch.chdir(run.parent)
    _refused(run, Path("run") / "results.json", capsys, predicted)


# -- outputs that cannot be written ------------------------------------------------------------
def test_an_out_that_is_a_folder_is_refused(run, tmp_path, capsys, predicted):
    folder = tmp_path / "folder"
    folder.mkdir()
    line = _refused(run, folder, capsys, predicted)
    assert "folder" in line
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("below", ["x.zip", "sub/x.zip"])
def test_an_out_under_a_file_is_refused(run, tmp_path, below, capsys, predicted):
    afile = tmp_path / "recipe.toml"
    afile.write_text("mine\n")
    line = _refused(run, afile / below, capsys, predicted)
    assert str(afile) in line and "is a file" in line
    assert afile.read_text() == "mine\n"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"),
                    reason="needs Linux's /proc")
@pytest.mark.parametrize("out", ["/proc/x.zip", "/proc/new/x.zip"])
def test_an_out_where_no_file_can_be_created_is_refused(run, out, capsys, predicted):
    line = _refused(run, out, capsys, predicted)
    assert "cannot write" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes in read-only folders")
def test_an_out_in_a_read_only_folder_is_refused(run, tmp_path, capsys, predicted):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(run, ro / "new" / "x.zip", capsys, predicted)
    finally:
        ro.chmod(0o755)
    assert "not writable" in line and list(ro.iterdir()) == []


def test_an_oserror_while_writing_is_one_line_and_leaves_nothing(run, tmp_path, capsys, predicted, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    out = tmp_path / "new" / "deeper" / "sub.zip"
    capsys.readouterr()
    before = _snapshot(run)
    rc = main(["decathlon", "submit", str(run), "--out", str(out)])
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert rc == 2 and len(lines) == 1 and str(out) in lines[0] and "No space left" in lines[0], cap.err
    assert len(predicted) == 1  # the write itself failed, after predicting
    assert not (tmp_path / "new").exists()  # no partial zip, no temp file, no folder it made
    assert _snapshot(run) == before


# -- what stays allowed ------------------------------------------------------------------------
def test_the_default_and_a_new_folder_still_work(run, tmp_path, capsys, predicted):
    before = _snapshot(run)
    assert main(["decathlon", "submit", str(run)]) == 0
    assert main(["decathlon", "submit", str(run)]) == 0  # re-submitting replaces RUN/submission.zip
    assert main(["decathlon", "submit", str(run), "--out", str(run / "submission.zip")]) == 0
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != "submission.zip"} == before
    out = tmp_path / "a" / "b" / "sub.zip"
    assert main(["decathlon", "submit", str(run), "--out", str(out)]) == 0
    for zpath in (run / "submission.zip", out):
        with zipfile.ZipFile(zpath) as zf:
            assert zf.namelist() == ["results.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub.zip"]
    assert len(predicted) == 4
