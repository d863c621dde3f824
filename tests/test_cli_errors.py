"""Bad input: a one-line error naming the file and field or plugin, exit code 2, no
traceback, and no new or changed files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[tasks.shape]
name = "classification"
params = { num_classes = 4, target = "shape" }
[data]
name = "synthetic_classification"
params = { size = 8, num_train = 8, num_val = 4 }
[training]
epochs = 1
batch_size = 4
device = "cpu"
"""


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run_cli(args, cwd: Path):
    env = dict(os.environ, MTLKIT_LOAD_ENTRY_POINTS="0", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "mtlkit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def expect_error(tmp_path: Path, args, *needles: str):
    before = snapshot(tmp_path)
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(tmp_path) == before, "the command wrote or changed files"
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "r.toml") -> str:
    (tmp_path / name).write_text(text)
    return name


@pytest.mark.parametrize("command", ["validate", "run"])
def test_malformed_toml(tmp_path, command):
    name = write(tmp_path, GOOD + "\n[training\n")
    expect_error(tmp_path, [command, name], "r.toml", "malformed TOML")


def test_unknown_key_with_hint(tmp_path):
    name = write(tmp_path, GOOD.replace("epochs = 1", "epochs = 1\nbatch_sise = 3"))
    expect_error(tmp_path, ["run", name], "r.toml", "[training]", "batch_sise", "did you mean 'batch_size'")


def test_unknown_plugin_param_with_hint(tmp_path):
    name = write(tmp_path, GOOD + '\n[weighting]\nname = "equal"\nparams = { meen = true }\n')
    expect_error(tmp_path, ["run", name], "r.toml", "[weighting.params]", "meen", "did you mean 'mean'")


def test_wrong_type(tmp_path):
    name = write(tmp_path, GOOD.replace("epochs = 1", 'epochs = "many"'))
    expect_error(tmp_path, ["run", name], "r.toml", "[training]", "epochs")


def test_unknown_component(tmp_path):
    name = write(tmp_path, GOOD.replace('name = "small_cnn"', 'name = "smal_cnn"'))
    expect_error(tmp_path, ["run", name], "r.toml", "[model.backbone]", "did you mean 'small_cnn'",
                 "mtlkit list backbone")


def test_plugin_module_that_does_not_import(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_package_xyz\n")
    name = write(tmp_path, 'plugins = ["broken.py"]\n' + GOOD)
    expect_error(tmp_path, ["run", name], "r.toml", "broken.py", "no_such_package_xyz")


def test_resume_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    expect_error(tmp_path, ["run", "--resume", "notarun"], "notarun", "not a run folder")


def test_unknown_recipe_name(tmp_path):
    expect_error(tmp_path, ["run", "quickstrt"], "quickstrt", "did you mean 'quickstart'")


def test_several_errors_reported_at_once(tmp_path):
    text = GOOD.replace("epochs = 1", 'epochs = "x"').replace('name = "small_cnn"', 'name = "smal_cnn"')
    name = write(tmp_path, text)
    proc = run_cli(["validate", name], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and any("epochs" in l for l in lines) and any("smal_cnn" in l for l in lines)


def test_debug_shows_traceback(tmp_path):
    name = write(tmp_path, GOOD.replace('name = "small_cnn"', 'name = "smal_cnn"'))
    proc = run_cli(["--debug", "validate", name], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_missing_data_path_names_layout_and_flag(tmp_path):
    line = expect_error(tmp_path, ["run", "nyuv2/mtan"], "data/nyuv2", "{image,label,depth,normal}", "--synthetic")
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
def test_resume_refuses_a_damaged_checkpoint(tiny_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
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
    expect_error(tmp_path, ["run", "--resume", "run"], "checkpoints", needle)


SEG = """
[model.backbone]
name = "segnet"
params = { width = 0.0625 }
[model.attention]
name = "mtan"
[tasks.segmentation]
name = "segmentation"
params = { num_classes = 7 }
[data]
name = "synthetic_scenes"
params = { height = 32, width = 32, num_train = 2, num_val = 2, num_classes = 7 }
[training]
epochs = 1
batch_size = 2
device = "cpu"
"""

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


def test_head_output_channels_must_match_the_task(tmp_path):
    (tmp_path / "heads.py").write_text(HEAD_PLUGIN)
    name = write(tmp_path, 'plugins = ["heads.py"]\n' + SEG + '[model.heads.segmentation]\nname = "five_channels"\n')
    expect_error(tmp_path, ["run", name], "[model.heads.segmentation]", "5 output channels", "needs 7")


def test_attention_on_a_backbone_without_taps(tmp_path):
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
    (tmp_path / "flat.py").write_text(plugin)
    name = write(tmp_path, 'plugins = ["flat.py"]\n' + SEG.replace('name = "segnet"\nparams = { width = 0.0625 }',
                                                                    'name = "flat"'))
    expect_error(tmp_path, ["run", name], "model.attention", "mtan")


def test_weighting_that_cannot_take_the_task_count(tmp_path):
    name = write(tmp_path, SEG + '[weighting]\nname = "pcgrad"\n')
    expect_error(tmp_path, ["run", name], "weighting", "pcgrad", "at least 2 tasks")


def test_width_that_empties_a_stage(tmp_path):
    name = write(tmp_path, SEG.replace("width = 0.0625", "widths = [8, 16, 0, 32, 32]"))
    expect_error(tmp_path, ["run", name], "model.backbone.params.width")
