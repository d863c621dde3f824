"""Generated docs are current; every hook is documented and tested."""

from __future__ import annotations

import inspect
from pathlib import Path

from mtlkit import docgen, hookspecs

ROOT = Path(__file__).resolve().parent.parent


def test_generated_docs_are_current():
    for name, fn in docgen.GENERATED.items():
        on_disk = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert on_disk == fn(), f"docs/{name} is stale: run python -m mtlkit.docgen"


def test_cli_reference_is_current():
    from mtlkit.cli import reference

    on_disk = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert on_disk == reference.cli_reference(), "docs/cli.md is stale: run python -m mtlkit.cli.reference"
    for words in ("run", "doctor", "data synth-scenes", "compare"):  # built-ins and a built-in plugin's
        assert f"## `mtlkit {words}`" in on_disk, words
    assert "| `--logger` |" in on_disk and "(repeatable)" in on_disk


def _hook_names():
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]


def test_every_hook_is_documented():
    hooks = _hook_names()
    assert hooks, "no register_* hooks found"
    guide = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    for name in hooks:
        assert inspect.getdoc(getattr(hookspecs, name)), f"hook {name} has no docstring"
        assert f"`{name}`" in guide, f"hook {name} is not documented in docs/writing-plugins.md"


def _component_probe(hook):
    def impl(register):
        register(f"probe_{hook}", lambda params, **context: None, description=f"probe of {hook}")
    return impl


def _commands_probe(register):
    def configure(parser):
        parser.add_argument("--word", default="none")

    register("probe-cmd", lambda args: print(f"probe said {args.word}") or 0, configure=configure, help="a probe")
    register("inner", lambda args: print("grouped probe") or 0, group="probe-group")


def _check_commands(pm, capsys):
    from mtlkit.cli import main

    assert main(["probe-cmd", "--word", "hello"]) == 0 and "probe said hello" in capsys.readouterr().out
    assert main(["probe-group", "inner"]) == 0 and "grouped probe" in capsys.readouterr().out


def _columns_probe(register):
    register("probe_col", lambda summary: summary["evaluations"] * 2, fmt="{:d}x", note="probe: doubled")


def _check_columns(pm, capsys):
    from mtlkit.cli.compare import compare_columns

    column = next(c for c in compare_columns(pm) if c.name == "probe_col")
    assert column.plugin == "probe_plugin" and column.note == "probe: doubled"
    assert column.cell({"evaluations": 3, "run": "r"}) == "6x"


def _writers_probe(register):
    register("probe_data", lambda run, split, out: [out / f"{split}.txt"], description="probe results")


def _check_writers(pm, capsys):
    from mtlkit.predict import result_writers

    write, description, plugin = result_writers(pm)["probe_data"]
    assert plugin == "probe_plugin" and description == "probe results"
    assert write(None, "test", Path("x")) == [Path("x") / "test.txt"]


def _sources_probe(register):
    from mtlkit.fetch import Archive

    register("probe_data", [Archive(name="a", url="http://127.0.0.1/get/a.zip?dl=1", format="zip",
                                    places=(("train", "."),))], recipe="probe.toml", description="probe source")


def _check_sources(pm, capsys):
    from mtlkit.fetch import data_sources

    source = data_sources(pm)["probe_data"]
    assert source.plugin == "probe_plugin" and source.recipe == "probe.toml"
    assert [a.file_name for a in source.archives] == ["a.zip"]


# hooks beyond the component kinds: the probe's implementation and how it is checked
OTHER_HOOKS = {"register_commands": (_commands_probe, _check_commands),
               "register_compare_columns": (_columns_probe, _check_columns),
               "register_result_writers": (_writers_probe, _check_writers),
               "register_data_sources": (_sources_probe, _check_sources)}


def test_every_hook_is_exercised_by_a_probe_plugin(fresh_pm, capsys):
    """A plugin implementing every hook. Each component it registers through a component
    hook's ``register`` lands in the registry under the kind the hook is named after; each
    other hook's registrations work where mtlkit uses them (a new hook needs a probe here)."""
    from types import SimpleNamespace

    from mtlkit import hookimpl
    from mtlkit.plugin_manager import HOOK_KINDS

    hooks = _hook_names()
    assert set(hooks) == set(HOOK_KINDS) | set(OTHER_HOOKS), "a hook without a probe in this test"

    def implementation(hook):
        impl = OTHER_HOOKS[hook][0] if hook in OTHER_HOOKS else _component_probe(hook)

        def named(register):
            return impl(register)
        named.__name__ = hook
        return hookimpl(named)

    plugin = SimpleNamespace(**{h: implementation(h) for h in hooks})
    fresh_pm.register(plugin, name="probe_plugin")
    registry = fresh_pm.registry
    for hook, kind in HOOK_KINDS.items():
        assert kind == hook.removeprefix("register_").removesuffix("s")  # register_heads -> head
        component = registry.get(kind, f"probe_{hook}")
        assert component.plugin == "probe_plugin" and component.description == f"probe of {hook}"
    for _, check in OTHER_HOOKS.values():
        check(fresh_pm, capsys)


def test_weightings_page_lists_every_weighting():
    """docs/weightings.md: one table row per registered weighting, and its sweep command
    names every one."""
    import re

    from mtlkit.plugin_manager import get_registry

    text = (ROOT / "docs" / "weightings.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    names = set(get_registry().names("weighting"))
    assert rows == names
    grid = re.search(r"--grid weighting.name=([\w,]+)", text)
    assert grid and set(grid.group(1).split(",")) == names
    # the reads/step column is each method's declared Weighting.host_reads_per_step
    table = [line for line in text.splitlines() if line.startswith("| name |") or line.startswith("| `")]
    column = [c.strip() for c in table[0].split("|")].index("reads/step")
    for line in table[1:]:
        cells = [c.strip() for c in line.split("|")]
        declared = get_registry().get("weighting", cells[1].strip("`")).factory.host_reads_per_step
        assert cells[column] == str(declared), cells[1]
