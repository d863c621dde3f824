"""Bad input: a one-line error naming the file and field or plugin, exit code 2, no
traceback, and no new or changed files. In-process (``main`` raising would be the traceback
a user sees); tests/test_cli_run.py runs the real ``python -m mtlkit`` once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlkit.testing import TINY_CLASSIFICATION_RECIPE
from tiny_recipes import TINY_SEGMENTATION_RECIPE
from mtlkit.cli import main
from mtlkit.errors import ConfigError

GOOD = TINY_CLASSIFICATION_RECIPE


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, fresh_pm):
    """The test folder as the current folder, and a plugin manager of its own (recipes
    here load plugin files)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def expect_error(in_tmp, capsys):
    def check(args, *needles: str) -> str:
        before = snapshot(in_tmp)
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        assert rc == 2, (out.out, out.err)
        lines = [line for line in out.err.splitlines() if line.strip()]
        assert len(lines) == 1, out.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        assert snapshot(in_tmp) == before, "the command wrote or changed files"
        return lines[0]

    return check


def write(folder: Path, text: str, name: str = "r.toml") -> str:
    (folder / name).write_text(text)
    return name


@pytest.mark.parametrize("command", ["validate", "run"])
def test_malformed_toml(in_tmp, expect_error, command):
    name = write(in_tmp, GOOD + "\n[training\n")
    expect_error([command, name], "r.toml", "malformed TOML")


def test_unknown_key_with_hint(in_tmp, expect_error):
    name = write(in_tmp, GOOD.replace("epochs = 1", "epochs = 1\nbatch_sise = 3"))
    expect_error(["run", name], "r.toml", "[training]", "batch_sise", "did you mean 'batch_size'")


def test_unknown_plugin_param_with_hint(in_tmp, expect_error):
    name = write(in_tmp, GOOD + '\n[weighting]\nname = "equal"\nparams = { meen = true }\n')
    expect_error(["run", name], "r.toml", "[weighting.params]", "meen", "did you mean 'mean'")


def test_wrong_type(in_tmp, expect_error):
    name = write(in_tmp, GOOD.replace("epochs = 1", 'epochs = "many"'))
    expect_error(["run", name], "r.toml", "[training]", "epochs")


def test_unknown_component(in_tmp, expect_error):
    name = write(in_tmp, GOOD.replace('name = "small_cnn"', 'name = "smal_cnn"'))
    expect_error(["run", name], "r.toml", "[model.backbone]", "did you mean 'small_cnn'",
                 "mtlkit list backbone")


def test_plugin_module_that_does_not_import(in_tmp, expect_error):
    (in_tmp / "broken.py").write_text("import no_such_package_xyz\n")
    name = write(in_tmp, 'plugins = ["broken.py"]\n' + GOOD)
    expect_error(["run", name], "r.toml", "broken.py", "no_such_package_xyz")


def test_resume_on_a_folder_that_is_not_a_run(in_tmp, expect_error):
    (in_tmp / "notarun").mkdir()
    expect_error(["run", "--resume", "notarun"], "notarun", "not a run folder")


def test_unknown_recipe_name(in_tmp, expect_error):
    expect_error(["run", "quickstrt"], "quickstrt", "did you mean 'quickstart'")


def test_several_errors_reported_at_once(in_tmp, capsys):
    text = GOOD.replace("epochs = 1", 'epochs = "x"').replace('name = "small_cnn"', 'name = "smal_cnn"')
    name = write(in_tmp, text)
    assert main(["validate", name]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and any("epochs" in l for l in lines) and any("smal_cnn" in l for l in lines)


def test_debug_shows_traceback(in_tmp):
    name = write(in_tmp, GOOD.replace('name = "small_cnn"', 'name = "smal_cnn"'))
    with pytest.raises(ConfigError, match="smal_cnn"):  # raised, not printed: Python shows its traceback
        main(["--debug", "validate", name])


def test_missing_data_path_names_layout_and_flag(in_tmp, expect_error):
    line = expect_error(["run", "nyuv2/mtan"], "data/nyuv2", "{image,label,depth,normal}", "--synthetic")
    assert "does not exist" in line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mtlkit.cli import main

    base = tmp_path_factory.mktemp("runs")
    run = base / "r"
    (base / "r.toml").write_text(GOOD)
    assert main(["run", str(base / "r.toml"), "--quiet", "--run-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("damage", ["truncate", "pickle", "foreign_json"])
def test_resume_refuses_a_damaged_checkpoint(tiny_run, in_tmp, expect_error, damage):
    import shutil

    run = in_tmp / "run"
    shutil.copytree(tiny_run, run)
    step = run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["dir"]
    tensors = step / "model.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
        needle = "model.safetensors"
    elif damage == "pickle":
        import pickle

        tensors.write_bytes(pickle.dumps({"model.w": [1, 2, 3]}))
        needle = "model.safetensors"
    else:
        (step / "meta.json").write_text('{"hello": 1}')
        needle = "meta.json"
    expect_error(["run", "--resume", "run"], "checkpoints", needle)


SEG = TINY_SEGMENTATION_RECIPE + '[model.attention]\nname = "mtan"\n'

HEAD_PLUGIN = '''
from torch import nn
from mtlkit import hookimpl

@hookimpl
def register_heads(register):
    def five(params, in_channels, task):
        """Always five channels, whatever the task needs."""
        return nn.Conv2d(in_channels, 5, 1)
    register("five_channels", five)
'''


def test_head_output_channels_must_match_the_task(in_tmp, expect_error):
    (in_tmp / "heads.py").write_text(HEAD_PLUGIN)
    name = write(in_tmp, 'plugins = ["heads.py"]\n' + SEG + '[model.heads.segmentation]\nname = "five_channels"\n')
    expect_error(["run", name], "[model.heads.segmentation]", "5 output channels", "needs 7")


def test_attention_on_a_backbone_without_taps(in_tmp, expect_error):
    plugin = '''
import torch
from torch import nn
from mtlkit import hookimpl

class Flat(nn.Module):
    out_channels, out_stride, feature_info = 4, 1, []
    def __init__(self, params):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
    def forward(self, x):
        return self.conv(x)

@hookimpl
def register_backbones(register):
    register("flat", Flat)
'''
    (in_tmp / "flat.py").write_text(plugin)
    name = write(in_tmp, 'plugins = ["flat.py"]\n' + SEG.replace('name = "segnet"\nparams = { width = 0.0625 }',
                                                                    'name = "flat"'))
    expect_error(["run", name], "model.attention", "mtan")


def test_weighting_that_cannot_take_the_task_count(in_tmp, expect_error):
    name = write(in_tmp, SEG + '[weighting]\nname = "pcgrad"\n')
    expect_error(["run", name], "weighting", "pcgrad", "at least 2 tasks")


def test_width_that_empties_a_stage(in_tmp, expect_error):
    name = write(in_tmp, SEG.replace("width = 0.0625", "widths = [8, 16, 0, 32, 32]"))
    expect_error(["run", name], "model.backbone.params.width")
