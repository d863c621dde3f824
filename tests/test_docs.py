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


def test_every_hook_documented_and_tested():
    hooks = _hook_names()
    assert len(hooks) == 6
    guide = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    tests_text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")
                           if p.name != "test_docs.py")
    for name in hooks:
        fn = getattr(hookspecs, name)
        assert inspect.getdoc(fn), f"hook {name} has no docstring"
        assert f"`{name}`" in guide, f"hook {name} is not documented in docs/writing-plugins.md"
        assert name in tests_text, f"hook {name} is not exercised by any test"
