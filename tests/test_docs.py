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


def _hook_names():
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]


def test_every_hook_is_documented():
    hooks = _hook_names()
    assert hooks, "no register_* hooks found"
    guide = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    for name in hooks:
        assert inspect.getdoc(getattr(hookspecs, name)), f"hook {name} has no docstring"
        assert f"`{name}`" in guide, f"hook {name} is not documented in docs/writing-plugins.md"


def test_every_hook_registers_into_its_kind(fresh_pm):
    """A plugin implementing every hook: each component it registers through a hook's
    ``register`` callback lands in the registry under the kind the hook is named after."""
    from types import SimpleNamespace

    from mtlkit import hookimpl

    def implementation(hook):
        def impl(register):
            register(f"probe_{hook}", lambda params, **context: None, description=f"probe of {hook}")
        impl.__name__ = hook
        return hookimpl(impl)

    hooks = _hook_names()
    plugin = SimpleNamespace(**{h: implementation(h) for h in hooks})
    fresh_pm.register(plugin, name="probe_plugin")
    registry = fresh_pm.registry
    for hook in hooks:
        kind = hook.removeprefix("register_").removesuffix("s")  # register_heads -> head
        component = registry.get(kind, f"probe_{hook}")
        assert component.plugin == "probe_plugin" and component.description == f"probe of {hook}"
