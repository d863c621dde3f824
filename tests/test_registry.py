"""Registry and plugin manager: registration, lookup, errors, lazy loading."""

from __future__ import annotations

import sys
import textwrap

import pytest
from pydantic import BaseModel, ConfigDict

from mtlkit import hookimpl
from mtlkit.errors import ConfigError, PluginError, UnknownComponentError
from mtlkit.plugin_manager import MtlkitPluginManager
from mtlkit.registry import KINDS, Registry


class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = 2.0


def test_register_get_and_glob():
    r = Registry()
    r.register("weighting", "dwa", lambda p, **k: p, params=P, description="d", plugin="a")
    r.register("weighting", "dwb", lambda p, **k: p, plugin="a")
    r.register("backbone", "segnet", lambda p, **k: p, plugin="a")
    assert r.get("weighting", "dwa").params is P
    assert [c.name for c in r.list("weighting", "dw*")] == ["dwa", "dwb"]
    assert [c.name for c in r.list(pattern="seg*")] == ["segnet"]
    assert r.get("weighting", "dwa").build({"temperature": 3}).temperature == 3.0


def test_duplicate_names_both_plugins():
    r = Registry()
    r.register("head", "x", lambda p: p, plugin="first_plugin")
    with pytest.raises(PluginError) as e:
        r.register("head", "x", lambda p: p, plugin="second_plugin")
    assert "first_plugin" in str(e.value) and "second_plugin" in str(e.value)


def test_unknown_name_did_you_mean_and_command():
    r = Registry()
    r.register("attention", "cross_stitch", lambda p: p, plugin="a")
    with pytest.raises(UnknownComponentError) as e:
        r.get("attention", "cross_stich")
    msg = str(e.value)
    assert "did you mean 'cross_stitch'" in msg and "mtlkit list attention" in msg
    with pytest.raises(UnknownComponentError):
        r.get("nonkind", "x")


def test_params_validation_one_line_with_hint():
    r = Registry()
    c = r.register("weighting", "dwa", lambda p, **k: p, params=P, plugin="a")
    with pytest.raises(ConfigError) as e:
        c.build({"temprature": 2})
    assert "did you mean 'temperature'" in str(e.value) and "\n" not in str(e.value)


def test_builtins_load_through_the_plugin_path(fresh_pm):
    builtins = [name for name, source in fresh_pm.sources.items() if source == "builtin"]
    assert builtins and all(name.startswith("mtlkit.plugins.") for name in builtins)
    assert not fresh_pm.failed_plugins
    # every kind has at least one built-in component
    assert all(fresh_pm.registry.list(kind) for kind in KINDS)


class _Plugin:
    @hookimpl
    def register_weightings(self, register):
        register("my_weighting", lambda p, task_names: ("built", task_names), description="mine")


def test_register_object_plugin_and_duplicate(fresh_pm):
    fresh_pm.register(_Plugin(), name="my_plugin")
    comp = fresh_pm.registry.get("weighting", "my_weighting")
    assert comp.plugin == "my_plugin" and comp.build(task_names=["a"]) == ("built", ["a"])

    class Clash:
        @hookimpl
        def register_weightings(self, register):
            register("equal", lambda p, task_names: None)

    fresh_pm.register(Clash(), name="clash_plugin")
    with pytest.raises(PluginError) as e:
        fresh_pm.registry
    assert "clash_plugin" in str(e.value) and "mtlkit.plugins.weightings.equal" in str(e.value)


def test_recipe_named_module_and_file(fresh_pm, tmp_path):
    src = textwrap.dedent('''
        from mtlkit import hookimpl
        @hookimpl
        def register_heads(register):
            def factory(params, in_channels, task):
                """A file head."""
                return None
            register("file_head", factory)
    ''')
    f = tmp_path / "file_plugin.py"
    f.write_text(src)
    name = fresh_pm.load_module(str(f))
    assert fresh_pm.registry.get("head", "file_head").plugin == name
    assert fresh_pm.registry.get("head", "file_head").description == "A file head."
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import does_not_exist_xyz\n")
    with pytest.raises(PluginError) as e:
        fresh_pm.load_module(str(bad), where="r.toml [plugins]")
    assert "bad_plugin.py" in str(e.value) and "does_not_exist_xyz" in str(e.value)
    with pytest.raises(PluginError):
        fresh_pm.load_module("no_such_module_abc")


def test_entry_points_load_lazily(tmp_path, monkeypatch):
    """A .dist-info folder on sys.path exposes an entry point, as an installed package would."""
    pkg = tmp_path / "ep_plugin_mod.py"
    pkg.write_text(textwrap.dedent('''
        from mtlkit import hookimpl
        LOADED = True
        @hookimpl
        def register_tasks(register):
            register("ep_task", lambda params, name: name, description="from an entry point")
    '''))
    dist = tmp_path / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mtlkit]\nep_plugin = ep_plugin_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ep_plugin_mod", None)
    pm = MtlkitPluginManager(load_entry_points=True)
    assert "ep_plugin_mod" not in sys.modules  # lazy: nothing imported yet
    assert pm.registry.get("task", "ep_task").plugin == "ep_plugin"
    assert pm.sources["ep_plugin"] == "entry point"
    off = MtlkitPluginManager(load_entry_points=False)
    with pytest.raises(UnknownComponentError):
        off.registry.get("task", "ep_task")


def test_top_level_plugins_import_is_refused(monkeypatch):
    import mtlkit.plugins as real
    from pathlib import Path

    root = Path(real.__file__).parent.parent
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("plugins", None)
    with pytest.raises(ImportError, match="mtlkit.plugins"):
        __import__("plugins")
    sys.modules.pop("plugins", None)

