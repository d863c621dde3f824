"""Commands and compare columns from plugins: clashes are one-line errors naming both
plugins, an entry point's broken hook is left out (with its traceback under --debug), and a
column is shown only where a run has a value."""

from __future__ import annotations

import sys

import pytest

from mtlkit.testing import TINY_CLASSIFICATION_RECIPE
from mtlkit import hookimpl, plugin_manager
from mtlkit.cli import main
from mtlkit.plugin_manager import MtlkitPluginManager


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name,group,clash", [("run", None, "mtlkit run"),
                                              ("synth-scenes", "data", "mtlkit data synth-scenes"),
                                              ("data", None, "mtlkit data fetch")])
def test_a_command_name_already_taken(fresh_pm, capsys, name, group, clash):
    class Clashing:
        @hookimpl
        def register_commands(self, register):
            register(name, lambda args: 0, group=group)

    fresh_pm.register(Clashing(), name="clashing_plugin")
    assert main(["list", "task"]) == 2
    line = one_error_line(capsys)
    assert "clashing_plugin" in line and clash in line and "mtlkit." in line.split("of plugin")[1]


def test_a_bad_command_registration(fresh_pm, capsys):
    class Odd:
        @hookimpl
        def register_commands(self, register):
            register("--odd", lambda args: 0)

    fresh_pm.register(Odd(), name="odd_plugin")
    assert main(["list", "task"]) == 2
    assert "odd_plugin" in one_error_line(capsys)


@pytest.fixture
def entry_point_plugin(tmp_path, monkeypatch):
    """An installed package's plugin whose register_commands fails, the manager loading it."""
    (tmp_path / "ep_cmd_plugin.py").write_text(
        "from mtlkit import hookimpl\n\ndef deep():\n    raise ValueError('broken command table')\n\n"
        "@hookimpl\ndef register_commands(register):\n    deep()\n\n"
        "@hookimpl\ndef register_tasks(register):\n    register('ep_task', lambda params, name: None)\n")
    dist = tmp_path / "ep_cmd-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-cmd\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mtlkit]\nep_cmd = ep_cmd_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin_manager, "_MANAGER", MtlkitPluginManager(load_entry_points=True))
    yield
    sys.modules.pop("ep_cmd_plugin", None)


def test_an_entry_points_broken_command_hook_is_left_out(entry_point_plugin, capsys):
    assert main(["list", "task"]) == 0
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if line.strip()]
    assert len(warning) == 1 and "ep_cmd" in warning[0] and "broken command table" in warning[0]
    assert "Traceback" not in out.err and "ep_task" not in out.out  # the whole plugin is left out


def test_debug_shows_an_entry_points_traceback(entry_point_plugin, capsys):
    assert main(["--debug", "list", "task"]) == 0  # still only a warning: other commands go on
    err = capsys.readouterr().err
    assert "Traceback" in err and "in deep" in err and "warning: plugin 'ep_cmd'" in err


# -- compare columns ------------------------------------------------------------------------------
RECIPE = TINY_CLASSIFICATION_RECIPE


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("cols")
    (base / "tiny.toml").write_text(RECIPE)
    assert main(["run", str(base / "tiny.toml"), "--quiet", "--run-dir", str(base / "run")]) == 0
    return base / "run"


def test_columns_show_only_where_a_run_has_a_value(finished, fresh_pm, tmp_path, capsys):
    class Columns:
        @hookimpl
        def register_compare_columns(self, register):
            register("acc_x2", lambda s: 2 * s["metrics"]["shape"]["accuracy"], fmt="{:.1f}", note="acc_x2: twice")
            register("never", lambda s: None, note="never shown")

    fresh_pm.register(Columns(), name="columns_plugin")
    assert main(["compare", str(finished), "--out", str(tmp_path / "t")]) == 0
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert "acc_x2" in header and "never" not in header
    assert "mean" not in header and "score" not in header  # the Decathlon columns: not a Decathlon run
    md = (tmp_path / "t.md").read_text()
    assert md.splitlines()[0].endswith("; acc_x2: twice") and "never shown" not in md


def test_a_column_that_fails_names_its_plugin(finished, fresh_pm, capsys):
    class Broken:
        @hookimpl
        def register_compare_columns(self, register):
            register("oops", lambda s: s["no_such_key"])

    fresh_pm.register(Broken(), name="broken_columns")
    assert main(["compare", str(finished)]) == 2
    line = one_error_line(capsys)
    assert "broken_columns" in line and "'oops'" in line and "KeyError" in line
