"""Bad input to the data, doctor and list commands and to the parsers themselves: one stderr
line naming the argument, URL or folder, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from mtlkit.cli import main


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """``refused(args, *needles)``: exit 2, one stderr line holding the needles, and no file
    written or changed in the (current) test folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.toml").write_text("x = 1\n")
    (tmp_path / "somedir").mkdir()

    def check(args, *needles: str) -> str:
        before = snapshot(tmp_path)
        capsys.readouterr()
        rc = main(list(args))
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert "Traceback" not in err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        assert snapshot(tmp_path) == before, "the command wrote or changed files"
        return lines[0]

    return check


SCENES = ["data", "synth-scenes", "out"]
DECATHLON = ["data", "synth-decathlon", "out"]


@pytest.mark.parametrize("option, value", [
    ("--height", "-5"), ("--height", "0"), ("--width", "3"), ("--num-classes", "0"), ("--num-classes", "5"),
    ("--seed", "-1"), ("--n", "0"), ("--n", "-1"), ("--n-val", "0"), ("--n", "many"),
])
def test_synth_scenes_numbers(refused, option, value):
    refused([*SCENES, option, value], f"argument {option}:", "synth-scenes")


def test_synth_scenes_class_count_of_the_cityscapes_layout(refused):
    refused([*SCENES, "--layout", "cityscapes", "--num-classes", "7"], "--num-classes", "19")


@pytest.mark.parametrize("option, value", [
    ("--image-size", "0"), ("--image-size", "-3"), ("--seed", "-1"), ("--n-train", "0"), ("--n-val", "-2"),
    ("--n-test", "-1"),
])
def test_synth_decathlon_numbers(refused, option, value):
    refused([*DECATHLON, option, value], f"argument {option}:", "synth-decathlon")


@pytest.mark.parametrize("command", [SCENES, DECATHLON], ids=["scenes", "decathlon"])
def test_output_that_is_a_file(refused, command):
    refused([*command[:2], "q.toml", *command[3:]], "'q.toml' is a file")
    refused([*command[:2], "q.toml/sub"], "q.toml' is a file")


def test_output_folder_that_cannot_be_written(refused, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # a read-only parent (root ignores chmod)
    refused([*SCENES, "--n", "1", "--height", "8", "--width", "8"], "out: cannot write", "Permission denied")
    refused([*DECATHLON, "--n-train", "1", "--n-val", "1", "--image-size", "16"], "out: cannot write")


@pytest.mark.parametrize("url, needle", [("notaurl", "not a URL"), ("http://[::1", "not a valid URL"),
                                         ("ftp://", "not a URL")])
def test_fetch_bad_url(refused, url, needle):
    refused(["data", "fetch", "nyuv2", "n", "--url", url], f"--url '{url}'", needle)


def test_fetch_missing_file_url_names_no_resume_file(refused):
    line = refused(["data", "fetch", "nyuv2", "n", "--url", "file:///nonexistent/nyuv2.zip"],
                   "file:///nonexistent/nyuv2.zip", "download failed")
    assert ".part" not in line and "resume" not in line


def test_fetch_folders(refused, monkeypatch):
    (Path("a.zip")).write_bytes(b"PK")
    refused(["data", "fetch", "nyuv2", "q.toml", "--from-archive", "a.zip"], "q.toml", "is a file")
    refused(["data", "fetch", "nyuv2", "q.toml/n", "--from-archive", "a.zip"], "q.toml' is a file")
    refused(["data", "fetch", "nyuv2", "n", "--from-archive", "somedir"], "'somedir' is a folder")
    refused(["data", "fetch", "nyuv2", "n", "--url", "file:///x.zip", "--download-dir", "q.toml"],
            "--download-dir 'q.toml'", "is a file")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    refused(["data", "fetch", "nyuv2", "n", "--from-archive", "a.zip"], "n: cannot create the folder",
            "Permission denied")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e9", "soon"])
def test_doctor_seconds(refused, value):
    refused(["doctor", "--seconds", value], "argument --seconds")


def test_list_unknown_kind(refused, capsys):
    refused(["list", "backbones"], "'backbones'", "did you mean 'backbone'?")
    refused(["list", "backbones", "small*"], "unknown kind 'backbones'", "did you mean 'backbone'?")
    assert main(["list", "zz*"]) == 0  # a glob that matches nothing: an empty table
    assert main(["list", "mtan"]) == 0 and "mtan" in capsys.readouterr().out  # a name is a glob too


@pytest.mark.parametrize("args, needles", [
    (["compare"], ("mtlkit compare: error:", "required: runs", "(see mtlkit compare --help)")),
    (["run", "quickstart", "--set"], ("mtlkit run: error:", "--set", "expected one argument")),
    (["data"], ("mtlkit data: error:", "COMMAND")),
    (["data", "nope"], ("mtlkit data: error:", "'nope'", "synth-scenes")),
    ([], ("mtlkit: error:", "command")),
    (["--debug=yes", "list"], ("mtlkit: error:", "--debug")),
])
def test_usage_errors_are_one_line(refused, args, needles):
    refused(args, *needles)


def test_help_still_exits_zero(capsys):
    assert main(["data", "synth-scenes", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_fetch_retries_must_be_a_small_whole_number(tmp_path, capsys):
    from mtlkit.cli import main

    assert main(["data", "fetch", "nyuv2", str(tmp_path / "d"), "--retries", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--retries" in err[0] and "from 0 to 100" in err[0], err
    assert not (tmp_path / "d").exists()
