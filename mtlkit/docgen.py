"""Generate docs/recipes.md (from the pydantic models) and docs/components.md (from the
registry). ``python -m mtlkit.docgen`` rewrites them; a test fails when they are stale.
docs/cli.md comes from the CLI's parsers (:mod:`mtlkit.cli.reference`, which the core does
not import): ``python -m mtlkit.cli.reference`` rewrites all three."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from .atomic import atomic_write_text
from .plugin_manager import get_registry
from .recipe.schema import Recipe
from .registry import KINDS


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(?:[a-z_]+\.)+(?=[A-Z])", "", text)  # mtlkit.recipe.schema.X -> X
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)  # list[Annotated[int, Gt(gt=0)]] -> list[int]
    return text.replace("NoneType", "None")


def _default(finfo) -> str:
    if finfo.is_required():
        return "required"
    value = finfo.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(table)"
    return f"`{value!r}`"


def _nested_models(annotation) -> list[type[BaseModel]]:
    out = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        out.append(annotation)
    for arg in typing.get_args(annotation):
        out.extend(_nested_models(arg))
    return out


def model_section(model: type[BaseModel], title: str, seen: set) -> list[str]:
    lines = [f"## `{title}`", "", (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "", "",
             "| field | type | default | description |", "|---|---|---|---|"]
    nested = []
    for fname, finfo in model.model_fields.items():
        desc = (finfo.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{fname}` | `{_type_name(finfo.annotation)}` | {_default(finfo)} | {desc} |")
        for sub in _nested_models(finfo.annotation):
            if sub not in seen:
                seen.add(sub)
                nested.append((sub, f"{title}.{fname}" if title != "recipe" else fname))
    lines.append("")
    for sub, sub_title in nested:
        lines += model_section(sub, sub_title, seen)
    return lines


def recipe_reference() -> str:
    lines = ["# Recipe reference", "",
             "Generated from the pydantic models by `python -m mtlkit.docgen`; do not edit by hand.",
             "Every table forbids unknown keys, and no float may be NaN or infinite. A component's",
             "`params` are checked against the plugin's own model: see [components.md](components.md).", ""]
    lines += model_section(Recipe, "recipe", {Recipe})
    return "\n".join(lines).rstrip() + "\n"


def components_reference() -> str:
    registry = get_registry()
    lines = ["# Built-in components", "",
             "Generated from the registry by `python -m mtlkit.docgen`; do not edit by hand.", ""]
    for kind in KINDS:
        lines += [f"## {kind}", ""]
        for c in registry.list(kind):
            if not c.plugin.startswith("mtlkit.plugins."):
                continue
            lines += [f"### `{c.name}`", "", c.description or "", "",
                      f"Plugin: `{c.plugin}`", ""]
            fields = c.params.model_fields
            if fields:
                lines += ["| param | type | default | description |", "|---|---|---|---|"]
                for fname, finfo in fields.items():
                    desc = (finfo.description or "").replace("|", "\\|").replace("\n", " ")
                    lines.append(f"| `{fname}` | `{_type_name(finfo.annotation)}` | {_default(finfo)} | {desc} |")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


GENERATED = {"recipes.md": recipe_reference, "components.md": components_reference}


def write(docs_dir: Path, generated: dict | None = None) -> list[Path]:
    """Write the ``generated`` pages (default: :data:`GENERATED`) into ``docs_dir``."""
    written = []
    for name, fn in (generated or GENERATED).items():
        path = docs_dir / name
        atomic_write_text(path, fn())
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    os.environ.setdefault("MTLKIT_LOAD_ENTRY_POINTS", "0")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs"
    for p in write(target):
        print(p)
