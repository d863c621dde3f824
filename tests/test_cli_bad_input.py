"""Bad input beyond the recipe: run folders that cannot be made, runs that fail before their
first checkpoint, unsafe run names, plugins pluggy refuses, heads that do not fit their task
or data (run folders and data files: test_cli_bad_input_runs.py). Each error is one line,
exit code 2, and leaves no file behind. (In-process: ``main`` raising would be the
traceback a user sees.)"""

from __future__ import annotations

import errno
import multiprocessing
import os
import pathlib
from pathlib import Path

import pytest

from mtlkit.testing import TINY_CLASSIFICATION_RECIPE
from tiny_recipes import TINY_SEGMENTATION_RECIPE
from mtlkit.cli import main

GOOD = TINY_CLASSIFICATION_RECIPE

SEG = TINY_SEGMENTATION_RECIPE


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def one_line_error(capsys, args, *needles: str, folder: Path | None = None) -> str:
    """Run ``mtlkit ARGS`` in-process: exit 2, one stderr line holding the needles, and
    (with ``folder``) no file written or changed under it."""
    before = snapshot(folder) if folder is not None else None
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if folder is not None:
        assert snapshot(folder) == before, "the command wrote or changed files"
    return lines[0]


def write(folder: Path, text: str, name: str = "r.toml") -> str:
    (folder / name).write_text(text)
    return str(folder / name)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- run folders that cannot be made -----------------------------------------------------------
@pytest.mark.parametrize("case", ["run_dir_exists", "run_dir_is_file", "runs_dir_is_file", "under_a_file"])
def test_run_folder_that_cannot_be_made(in_tmp, capsys, case):
    recipe = write(in_tmp, GOOD)
    (in_tmp / "taken").mkdir()
    (in_tmp / "afile").write_text("x")
    args, needle = {
        "run_dir_exists": (["--run-dir", "taken"], "taken"),
        "run_dir_is_file": (["--run-dir", "afile"], "afile"),
        "runs_dir_is_file": (["--runs-dir", "afile"], "afile"),
        "under_a_file": (["--run-dir", "afile/sub/run"], "afile"),
    }[case]
    one_line_error(capsys, ["run", recipe, "--quiet", *args], needle, "run folder", folder=in_tmp)


def test_runs_folder_under_proc(in_tmp, capsys):
    recipe = write(in_tmp, GOOD)
    one_line_error(capsys, ["run", recipe, "--quiet", "--runs-dir", "/proc/mtlkit-no-such/runs"],
                   "/proc/mtlkit-no-such/runs", "cannot be created", folder=in_tmp)
    assert not Path("/proc/mtlkit-no-such").exists()


def test_read_only_current_folder(in_tmp, capsys, monkeypatch):
    """Root may write anywhere, so a read-only file system is simulated: mkdir under the
    test folder fails as it would on one."""
    recipe = write(in_tmp, GOOD)
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(os.path.abspath(self)).startswith(str(in_tmp)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    one_line_error(capsys, ["run", recipe, "--quiet"], "runs", "Read-only file system", folder=in_tmp)


# -- run names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,text", [("name", 'name = "../../x"\n'), ("name", 'name = "a/b"\n'),
                                        ("[output] name", '[output]\nname = ".."\n')])
def test_run_name_must_be_one_folder_name(tmp_path, monkeypatch, capsys, field, text):
    work = tmp_path / "w" / "v"  # runs/../../x would be tmp_path/w/x
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = write(work, text + GOOD if field == "name" else GOOD + text)
    one_line_error(capsys, ["run", recipe, "--quiet"], recipe, field, "no path separators", folder=tmp_path)


# -- a run that fails before its first checkpoint leaves nothing --------------------------------
FLAKY = '''
import torch
from pydantic import BaseModel, ConfigDict
from mtlkit import hookimpl
from mtlkit.errors import DataError


class FlakyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bad_index: int = 5
    label: int = 0


class Flaky(torch.utils.data.Dataset):
    def __init__(self, params, split="train"):
        self.p = params

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == self.p.bad_index:
            raise DataError(f"flaky data: sample {i} is broken")
        return {"image": torch.rand(3, 8, 8), "label": torch.tensor(self.p.label)}


@hookimpl
def register_datasets(register):
    register("flaky", Flaky, params=FlakyParams)
'''

FLAKY_RECIPE = """plugins = ["flaky_data.py"]
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[tasks.label]
name = "classification"
params = { num_classes = 3 }
[data]
name = "flaky"
params = { %s }
[training]
epochs = 1
batch_size = 4
device = "cpu"
num_workers = %d
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_data_error_in_the_first_epoch_leaves_no_run_folder(in_tmp, capfd, fresh_pm, workers):
    (in_tmp / "flaky_data.py").write_text(FLAKY)
    recipe = write(in_tmp, FLAKY_RECIPE % ("", workers))
    before = {p.pid for p in multiprocessing.active_children()}
    # capfd: the workers' own output, too
    line = one_line_error(capfd, ["run", recipe, "--quiet"], folder=in_tmp)
    # with workers, the same line as without: the worker's traceback is not the message
    assert line == "error: flaky data: sample 5 is broken"
    assert not (in_tmp / "runs").exists()
    # and the workers ended with the run, not whenever the garbage collector frees its traceback
    assert [p.pid for p in multiprocessing.active_children() if p.pid not in before] == []


def test_labels_beyond_the_tasks_classes_found_before_the_run(in_tmp, capsys, fresh_pm):
    """The data set declares no class count: the first sample shows the mismatch."""
    (in_tmp / "flaky_data.py").write_text(FLAKY)
    recipe = write(in_tmp, FLAKY_RECIPE % ("label = 7, bad_index = 99", 0))
    one_line_error(capsys, ["run", recipe, "--quiet"], "[tasks.label]", "classification", "classifier",
                   "mtlkit.plugins.tasks.classification", "out of bounds", folder=in_tmp)


def test_declared_class_count_larger_than_the_task(in_tmp, capsys):
    recipe = write(in_tmp, GOOD.replace("num_classes = 4", "num_classes = 2"))
    one_line_error(capsys, ["run", recipe, "--quiet"], "[tasks.shape.params] num_classes", "task 'shape'",
                   "mtlkit.plugins.tasks.classification", "scores 2 classes", "has 4", folder=in_tmp)


@pytest.mark.parametrize("recipe_text,needles", [
    (SEG + '[model.heads.segmentation]\nname = "classifier"\n', ("task 'segmentation'", "head 'classifier'",
                                                                  "mtlkit.plugins.heads.classifier")),
    (GOOD + '[model.heads.shape]\nname = "dense_pred"\n', ("task 'shape'", "head 'dense_pred'",
                                                           "mtlkit.plugins.heads.dense_pred")),
])
def test_head_of_the_wrong_kind(in_tmp, capsys, recipe_text, needles):
    recipe = write(in_tmp, recipe_text)
    one_line_error(capsys, ["run", recipe, "--quiet"], *needles, folder=in_tmp)


# -- a recipe-relative plugin file: resume, compare and plot from another folder ---------------
HEAD_PLUGIN = '''
from torch import nn
from mtlkit import hookimpl
from mtlkit.contracts import apply_activation


class Pooled(nn.Module):
    def __init__(self, params, in_channels, task):
        super().__init__()
        self.act = task.output_activation
        self.fc = nn.Linear(in_channels, task.out_channels)

    def forward(self, x):
        return apply_activation(self.act, self.fc(x.mean((2, 3))))


@hookimpl
def register_heads(register):
    register("pooled_rel", Pooled)
'''


def test_recipe_relative_plugin_file_from_another_folder(tmp_path, capsys, monkeypatch, fresh_pm):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "rel_heads.py").write_text(HEAD_PLUGIN)
    write(a, 'plugins = ["rel_heads.py"]\n' + GOOD + '[model.heads.shape]\nname = "pooled_rel"\n')
    monkeypatch.chdir(a)
    assert main(["run", "r.toml", "--quiet", "--runs-dir", str(tmp_path / "runs")]) == 0
    run = next((tmp_path / "runs" / "r").iterdir())
    monkeypatch.chdir(b)
    rc = main(["run", "--resume", str(run), "--set", "training.epochs=2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    assert "r/" + run.name in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0
    assert list(b.iterdir()) == []


# -- plugins that pluggy refuses, or that fail --------------------------------------------------
@pytest.mark.parametrize("source,needles", [
    ("from mtlkit import hookimpl\n@hookimpl\ndef register_headz(register):\n    pass\n",
     ("unknown hook 'register_headz'", "did you mean 'register_heads'")),
    ("from mtlkit import hookimpl\n@hookimpl\ndef register_heads(reg):\n    pass\n", ("register_heads", "reg")),
    ("import sys\nsys.exit(3)\n", ("failed to import", "SystemExit")),
    ("from mtlkit import hookimpl\n@hookimpl\ndef register_heads(register):\n    raise RuntimeError('boom')\n",
     ("register_heads failed", "boom")),
])
def test_recipe_plugin_refused(in_tmp, capsys, fresh_pm, source, needles):
    (in_tmp / "odd_plugin.py").write_text(source)
    recipe = write(in_tmp, 'plugins = ["odd_plugin.py"]\n' + GOOD)
    one_line_error(capsys, ["run", recipe, "--quiet"], "odd_plugin", *needles, folder=in_tmp)
    assert main(["validate", write(in_tmp, GOOD, "ok.toml")]) == 0  # a refused plugin is not left behind


def test_debug_shows_the_plugins_own_traceback(in_tmp, capsys, fresh_pm):
    (in_tmp / "dbg_plugin.py").write_text("def helper():\n    raise ValueError('deep inside')\nhelper()\n")
    recipe = write(in_tmp, 'plugins = ["dbg_plugin.py"]\n' + GOOD)
    with pytest.raises(ValueError, match="deep inside") as info:
        main(["--debug", "validate", recipe])
    assert any(entry.name == "helper" for entry in info.traceback)
    one_line_error(capsys, ["validate", recipe], "dbg_plugin.py", "ValueError: deep inside")


def test_entry_point_with_an_unknown_hook_is_left_out(tmp_path, monkeypatch, capsys):
    import sys

    from mtlkit.plugin_manager import MtlkitPluginManager

    (tmp_path / "ep_bad_hook.py").write_text(
        "from mtlkit import hookimpl\n@hookimpl\ndef register_backbonez(register):\n    pass\n")
    dist = tmp_path / "ep_bad-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-bad\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mtlkit]\nep_bad = ep_bad_hook\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ep_bad_hook", None)
    pm = MtlkitPluginManager(load_entry_points=True)
    assert pm.registry.get("weighting", "equal")  # the others still work
    assert "register_backbonez" in pm.failed_plugins["ep_bad"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "ep_bad" in err[0] and "register_backbonez" in err[0]
    pm.register(type("Fine", (), {})(), name="fine")  # pluggy was left consistent
