"""`mtlkit validate` refuses what `mtlkit run` would refuse, with the same one-line message,
and `run` refuses it before writing anything; floats are finite; `--set` switches components."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from mtlkit.cli import main
from mtlkit.plugin_manager import get_registry
from mtlkit.recipe.loader import load_recipe
from mtlkit.recipe.schema import Recipe
from mtlkit.registry import Params, Registry, _scalar_leaves, scalar_mismatch

ONE_TO_MANY = """
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[tasks.shape]
name = "classification"
params = { num_classes = 4, target = "shape" }
[tasks.colour]
name = "classification"
params = { num_classes = 4, target = "colour" }
[data]
name = "synthetic_classification"
params = { size = 8, num_train = 4, num_val = 4 }
[training]
epochs = 1
batch_size = 2
device = "cpu"
"""

MANY_TO_MANY = """
[model.backbone]
name = "small_cnn"
params = { widths = [4, 8] }
[tasks.svhn]
name = "classification"
params = { num_classes = 10 }
data = { name = "synthetic_decathlon", params = { domain = "svhn", size = 16, n = 4 } }
[tasks.dtd]
name = "classification"
params = { num_classes = 8 }
data = { name = "synthetic_decathlon", params = { domain = "dtd", size = 16, n = 4 } }
[training]
epochs = 1
batch_size = 2
device = "cpu"
"""

SEGNET = """
[model.backbone]
name = "segnet"
params = { width = 0.0625 }
[tasks.segmentation]
name = "segmentation"
params = { num_classes = 7 }
[data]
name = "synthetic_scenes"
params = { height = 16, width = 16, num_train = 2, num_val = 2, num_classes = 7, noise = 0.01 }
[training]
epochs = 1
batch_size = 2
device = "cpu"
"""


# -- every float field is finite ----------------------------------------------------------
def _bad(annotation, x):
    """Values of ``annotation`` with ``x`` in one float slot (none if it holds no float)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        yield x
    elif origin is typing.Annotated:
        yield from _bad(args[0], x)
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _bad(a, x)
    elif origin in (list, set, frozenset):
        yield from ([v] for v in _bad(args[0], x))
    elif origin is tuple and Ellipsis not in args:
        for i, a in enumerate(args):
            if all(b is float for j, b in enumerate(args) if j != i):
                yield from (tuple(v if j == i else 0.5 for j in range(len(args))) for v in _bad(a, x))
    elif origin is dict:
        yield from ({"k": v} for v in _bad(args[1], x))


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for f in model.model_fields.values():
        stack = [f.annotation]
        while stack:
            a = stack.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                _models(a, seen)
            stack.extend(typing.get_args(a))


def _field_errors(model: type[BaseModel], field: str, value) -> list:
    try:
        model.model_validate({field: value})
    except ValidationError as exc:
        return [e for e in exc.errors() if e["loc"][:1] == (field,)]
    return []


def test_every_float_field_refuses_nan_and_inf():
    models: set = set()
    _models(Recipe, models)
    for component in get_registry().list():
        _models(component.params, models)
    checked, accepted = [], []
    for model in models:
        for name, info in model.model_fields.items():
            for good in _bad(info.annotation, 0.5):
                assert not _field_errors(model, name, good), (model.__name__, name, good)
            for x in (math.nan, math.inf, -math.inf):
                for value in _bad(info.annotation, x):
                    checked.append((model.__name__, name))
                    if not _field_errors(model, name, value):
                        accepted.append(f"{model.__name__}.{name} = {value!r}")
    assert not accepted, accepted
    fields = set(checked)
    # the walk is not vacuous: it reaches config sections and plugin params alike
    assert {("ScheduleConfig", "gamma"), ("OptimizerConfig", "lr"), ("OptimizerConfig", "betas"),
            ("TrainingConfig", "domain_loss_weight"), ("DWAParams", "temperature"),
            ("SyntheticClassificationParams", "noise"), ("SegNetParams", "width"),
            ("NashMTLParams", "ridge")} <= fields, sorted(fields)


def test_every_number_and_switch_field_refuses_values_of_another_type():
    """TOML values carry their type: no field reads true as 1, 1 as true or "3" as 3 (pydantic's
    lax mode would); every section and built-in params model, each field by its annotation."""
    models: set = set()
    _models(Recipe, models)
    for component in get_registry().list():
        _models(component.params, models)
    checked, accepted = set(), []
    for model in models:
        for name, info in model.model_fields.items():
            leaves = _scalar_leaves(info.annotation)
            if not leaves or str in leaves:
                continue
            wrong = ([True, False, "1", "0.5"] if not leaves - {int, float} else
                     [1, 0, "true"] if leaves == {bool} else [])
            for value in wrong:
                checked.add((model.__name__, name))
                errors = _field_errors(model, name, value)
                if not errors:
                    accepted.append(f"{model.__name__}.{name} = {value!r}")
                elif isinstance(value, bool) or isinstance(value, str):
                    assert errors[0]["type"] in ("scalar_type", "literal_error"), errors
    assert not accepted, accepted
    assert {("TrainingConfig", "batch_size"), ("TrainingConfig", "deterministic"), ("OptimizerConfig", "lr"),
            ("SegNetParams", "width"), ("DWAParams", "temperature")} <= checked, sorted(checked)


def test_the_scalar_rule_names_what_the_field_takes():
    from typing import Literal, Optional

    assert scalar_mismatch(int, True) == "expected a number, got true"
    assert scalar_mismatch(Optional[float], "3") == "expected a number, got the text '3'"
    assert scalar_mismatch(bool, 1) == "expected true/false, got the number 1"
    assert scalar_mismatch(bool | Literal["auto"], 0) == "expected text or true/false, got the number 0"
    for annotation, value in ((float | Literal["auto"], "auto"), (int, 3), (float, 2), (bool, False),
                              (Path, "x"), (list[int], True), (typing.Any, "x"), (bool | Literal["auto"], True)):
        assert scalar_mismatch(annotation, value) is None, (annotation, value)


def test_every_section_and_builtin_params_model_is_a_params():
    models: set = set()
    _models(Recipe, models)
    for component in get_registry().list():
        _models(component.params, models)
    assert all(m.model_config.get("allow_inf_nan") is False for m in models)
    assert all(issubclass(m, Params) for m in models if m.__module__.startswith("mtlkit."))


def test_a_third_party_params_model_gets_the_rule():
    class Inner(BaseModel):
        scale: float = 1.0

    class Theirs(BaseModel):
        temperature: float = 2.0
        inner: Inner = Inner()

    component = Registry().register("weighting", "theirs", lambda p, **k: p, params=Theirs, plugin="x")
    assert component.params is Theirs
    with pytest.raises(ValidationError):
        Theirs(temperature=math.inf)
    with pytest.raises(ValidationError):
        Theirs(inner={"scale": math.nan})


# -- validate and run refuse the same recipes -----------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused_alike(tmp_path, monkeypatch, capsys, text: str, *sets: str) -> str:
    """validate and run both exit 2 with the same single line; run writes nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(text)
    before = _files(tmp_path)
    args = [f"--set={s}" for s in sets]
    rc, validate = _cli(capsys, "validate", "r.toml", *args)
    assert rc == 2 and len(validate) == 1, validate
    rc, run = _cli(capsys, "run", "r.toml", "--quiet", *args)
    assert rc == 2 and run == validate, (run, validate)
    assert _files(tmp_path) == before, "run wrote files"
    return validate[0]


@pytest.mark.parametrize("text", [ONE_TO_MANY, MANY_TO_MANY])
def test_the_good_recipes_validate(tmp_path, monkeypatch, capsys, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(text)
    assert _cli(capsys, "validate", "r.toml") == (0, [])


META_SHY = """
from torch import nn
from mtlkit import hookimpl
from mtlkit.contracts import Backbone

class MetaShy(Backbone):
    def __init__(self, params):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.out_channels, self.out_stride, self.feature_info = 4, 1, []
        float(self.conv.weight.detach().sum())  # reads a value: impossible on the meta device

    def forward(self, x):
        return self.conv(x)

@hookimpl
def register_backbones(register):
    register("meta_shy", MetaShy)
"""


def test_validate_builds_for_real_what_the_meta_device_cannot(tmp_path, monkeypatch, capsys, fresh_pm):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shy.py").write_text(META_SHY)
    text = 'plugins = ["shy.py"]\n' + ONE_TO_MANY.replace('name = "small_cnn"\nparams = { widths = [4, 8] }',
                                                          'name = "meta_shy"')
    (tmp_path / "r.toml").write_text(text)
    assert _cli(capsys, "validate", "r.toml") == (0, [])
    (tmp_path / "r.toml").write_text(text.replace('target = "colour"', 'target = "color"'))
    rc, lines = _cli(capsys, "validate", "r.toml")
    assert rc == 2 and len(lines) == 1 and "no 'color'" in lines[0], lines


def test_width_zero(tmp_path, monkeypatch, capsys):
    line = refused_alike(tmp_path, monkeypatch, capsys, SEGNET.replace("width = 0.0625", "width = 0"))
    assert "r.toml [model.backbone.params] width:" in line and "greater than 0" in line


@pytest.mark.parametrize("setting", ["schedule.gamma", "optimizer.lr", "data.params.noise", "weighting.params.temperature"])
def test_inf(tmp_path, monkeypatch, capsys, setting):
    text = SEGNET + '[weighting]\nname = "dwa"\n[schedule]\nname = "step"\nstep_size = 1\n'
    line = refused_alike(tmp_path, monkeypatch, capsys, text, f"{setting}=inf")
    table, field = setting.rsplit(".", 1)
    assert f"--set {setting}=inf: [{table}] {field}: Input should be a finite number" in line


@pytest.mark.parametrize("text, sets, needles", [
    (MANY_TO_MANY, ["tasks.svhn.data.params.domain='svhnn'"],
     ["[tasks.svhn.data.params] domain", "unknown domain 'svhnn', did you mean 'svhn'?"]),
    (ONE_TO_MANY, ["training.best_metric='shpe/accuracy'"],
     ["[training] best_metric", "did you mean 'shape'?"]),
    (ONE_TO_MANY, ["training.best_metric='shape/acuracy'"],
     ["r.toml: training.best_metric: task 'shape' has no metric 'acuracy', did you mean 'accuracy'?"]),
    (ONE_TO_MANY, ["tasks.colour.params.target='color'"],
     ["r.toml: train_data: samples have no 'color' (the target of task 'colour'), did you mean 'colour'?"]),
    (MANY_TO_MANY, ["tasks.dtd.params.target='lable'"], ["samples have no 'lable'", "did you mean 'label'?"]),
    (SEGNET, ["weighting.name='pcgrad'"], ["weighting", "pcgrad", "at least 2 tasks"]),
    (MANY_TO_MANY, ["weighting.name='mgda'"], ["r.toml: weighting:", "gradient-level"]),
    (MANY_TO_MANY, ["training.domain_batch_size.svn=4"], ["domain_batch_size: 'svn'", "did you mean 'svhn'?"]),
    (ONE_TO_MANY, ["model.init_from.path='nowhere'"], ["r.toml [model.init_from] path:", "nowhere"]),
    # the Trainer's own checks of the weighting against the precision and the CUDA graphs
    (ONE_TO_MANY, ["training.precision='fp16'", "weighting.name='famo'"],
     ["r.toml: weighting: FAMO owns its backward step, which fp16 loss scaling does not cover"]),
    (ONE_TO_MANY, ["training.cuda_graph='on'"],
     ['r.toml: training.cuda_graph = "on": it needs a CUDA device (training runs on cpu)']),
], ids=["decathlon_domain", "best_metric_task", "best_metric_metric", "target", "target_m2m",
        "weighting_task_count", "gradient_weighting_m2m", "domain_batch_size", "init_from", "fp16_famo",
        "cuda_graph_on_cpu"])
def test_run_and_validate_refuse_alike(tmp_path, monkeypatch, capsys, text, sets, needles):
    line = refused_alike(tmp_path, monkeypatch, capsys, text, *sets)
    for needle in needles:
        assert needle in line, (needle, line)


def test_a_bad_first_validation_sample_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The first sample of every split is read: a validation image in 0..255 (the training one
    is fine) fails now, in one line naming the file, not at the first evaluation."""
    root = tmp_path / "scenes"
    assert main(["data", "synth-scenes", str(root), "--n", "2", "--n-val", "2", "--height", "32", "--width", "32",
                 "--num-classes", "7"]) == 0
    capsys.readouterr()
    text = SEGNET.replace('name = "synthetic_scenes"', 'name = "nyuv2"').replace(
        "params = { height = 16, width = 16, num_train = 2, num_val = 2, num_classes = 7, noise = 0.01 }",
        f"params = {{ root = '{root}', num_classes = 7 }}")
    (tmp_path / "r.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, "validate", "r.toml") == (0, [])
    image = root / "val" / "image" / "0.npy"
    np.save(image, np.load(image) * 255)
    line = refused_alike(tmp_path, monkeypatch, capsys, text)
    assert line.startswith(f"error: {image}: image must be float in [0, 1]"), line


def test_several_problems_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(ONE_TO_MANY)
    rc, lines = _cli(capsys, "validate", "r.toml", "--set", "training.best_metric='shape/acc'",
                     "--set", "tasks.colour.params.target='color'")
    assert rc == 2 and len(lines) == 2, lines
    assert "no metric 'acc'" in lines[0] and "no 'color'" in lines[1]


def test_missing_data_same_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, validate = _cli(capsys, "validate", "nyuv2/mtan")
    assert rc == 2 and len(validate) == 1 and "does not exist" in validate[0] and "--synthetic" in validate[0]
    assert _cli(capsys, "run", "nyuv2/mtan", "--quiet") == (2, validate)
    assert _files(tmp_path) == set()


# -- --set switches a component ------------------------------------------------------------
def test_set_switching_the_weighting_drops_the_old_params(capsys):
    assert _cli(capsys, "validate", "quickstart", "--set", "weighting.name=uncertainty")[0] == 0
    loaded = load_recipe("quickstart", overrides=["weighting.name=uncertainty"])
    assert loaded.resolved["weighting"] == {"name": "uncertainty", "params": {"init": -0.5}}


@pytest.mark.parametrize("sets", [["weighting.params.init=0.25", "weighting.name=uncertainty"],
                                  ["weighting.name=uncertainty", "weighting.params.init=0.25"]])
def test_set_params_of_the_new_component_are_kept(sets):
    assert load_recipe("quickstart", overrides=sets).resolved["weighting"]["params"] == {"init": 0.25}


def test_set_same_name_keeps_params():
    assert load_recipe("quickstart", overrides=["weighting.name=dwa"]).resolved["weighting"]["params"] == {
        "temperature": 2.0}


def test_bad_param_after_a_switch_names_the_set(capsys):
    rc, lines = _cli(capsys, "validate", "quickstart", "--set", "weighting.name=uncertainty",
                     "--set", "weighting.params.temperature=3")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --set weighting.params.temperature=3: [weighting.params] temperature: "
                               "unknown field"), lines[0]


@pytest.mark.parametrize("setting, needle", [
    ("data.params.seed=-1", "[data.params] seed: Input should be greater than or equal to 0"),
    ("training.seed=99999999999999999999999", "[training] seed: 99999999999999999999999 is beyond a 64-bit integer"),
    ("training.batch_size=9223372036854775808", "[training] batch_size: 9223372036854775808 is beyond a 64-bit"),
    ("data.params.seed=9223372036854775808", "[data.params] seed: 9223372036854775808 is beyond a 64-bit integer"),
])
def test_seeds_and_sizes_torch_cannot_take_are_one_line(tmp_path, monkeypatch, capsys, setting, needle):
    """TOML integers are unbounded and seeds were unchecked: numpy and torch failed deep inside."""
    line = refused_alike(tmp_path, monkeypatch, capsys, ONE_TO_MANY, setting)
    assert f"--set {setting}: {needle}" in line, line


def test_every_seed_of_a_built_in_plugin_is_at_least_0():
    """numpy's generators refuse negative seeds: each plugin's seed field says so up front."""
    registry = get_registry()
    seeds = {(kind, name) for kind in ("dataset", "weighting") for name in registry.names(kind)
             if registry.get(kind, name).params is not None and "seed" in registry.get(kind, name).params.model_fields}
    assert {("dataset", "nyuv2"), ("weighting", "pcgrad")} <= seeds
    for kind, name in seeds:
        with pytest.raises(ValidationError, match="greater than or equal to 0"):
            registry.get(kind, name).params.model_validate({"seed": -1})


def test_a_worker_count_far_beyond_the_cpus_is_refused(tmp_path, monkeypatch, capsys):
    import os

    many = 8 * (os.cpu_count() or 1) + 1
    line = refused_alike(tmp_path, monkeypatch, capsys, ONE_TO_MANY, f"training.num_workers={many}")
    assert f"training.num_workers = {many}: more than 8 loader processes per CPU" in line


def test_a_model_too_large_for_the_machine_is_one_line(tmp_path, monkeypatch, capsys):
    """36 TB of weights: the allocator's error names the plugin and its table, no traceback."""
    line = refused_alike(tmp_path, monkeypatch, capsys, ONE_TO_MANY, "model.backbone.params.widths=[1000000, 1000000]")
    assert "[model.backbone] backbone 'small_cnn': too large to build on this machine (" in line, line


@pytest.mark.parametrize("table, needle", [
    ("{nosuch = 1.0}", "[baselines] shape: 'nosuch' is not a metric of task 'shape' (it reports: accuracy, loss)"),
    ("{acuracy = 50.0}", "'acuracy' is not a metric of task 'shape', did you mean 'accuracy'?"),
    ("{accuracy = 0.0}", "[baselines] shape: accuracy = 0 cannot be a baseline (Delta_m divides by it)"),
    ("{loss = 1.0}", "[baselines] shape: no metric besides loss (task 'shape' reports: accuracy, loss)"),
])
def test_a_baseline_delta_m_cannot_use_is_refused_before_training(tmp_path, monkeypatch, capsys, table, needle):
    """Delta_m refused these only after the first epoch, once a run folder was written."""
    line = refused_alike(tmp_path, monkeypatch, capsys, ONE_TO_MANY, f"baselines.shape={table}")
    assert needle in line, line
