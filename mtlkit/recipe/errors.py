"""Turn pydantic validation errors into located one-line messages with hints."""

from __future__ import annotations

import typing
from typing import Callable

from pydantic import BaseModel, ValidationError

from ..errors import did_you_mean


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``M``, ``M | None``, ``list[M]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_names(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names valid at ``loc``'s parent, walking nested pydantic models (and the
    items of lists of them)."""
    current = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an item of a list of models: the item's model
        if current is None or part not in getattr(current, "model_fields", {}):
            return []
        current = _model_in(current.model_fields[part].annotation)
    return list(getattr(current, "model_fields", {})) if current is not None else []


def _dotted(parts) -> str:
    """``("stages", 1, "epochs")`` -> ``stages[1].epochs``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def format_validation_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                             location: str = "", origin: Callable[[str], str | None] | None = None) -> list[str]:
    """One message per error: ``prefix [a.b] field: message``; inside a list of tables,
    ``prefix a.b[i].field: message`` (``training.stages[1].epochs``).

    ``location`` is the TOML table the validated data sits at (``weighting.params``);
    ``origin(path)`` may name what set the field at that dotted path (a ``--set``), which
    then stands in for ``prefix``.
    """
    lines = []
    for err in exc.errors():
        raw = tuple(err.get("loc", ()))
        loc = tuple(str(p) for p in raw)
        field = loc[-1] if loc else ""
        parent = ".".join(p for p in (location, *loc[:-1]) if p)
        source = origin(".".join(p for p in (location, *loc) if p)) if origin is not None and loc else None
        head = f"{source}:" if source else prefix
        if err.get("type") == "extra_forbidden":
            hint = did_you_mean(field, _field_names(model, raw))
            text = f"unknown field{hint}"
        else:
            text = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if any(isinstance(p, int) for p in raw[:-1]):  # a field of a list item: name its whole path
            path = ".".join(p for p in (location, _dotted(raw)) if p)
            lines.append(f"{head} {path}: {text}".strip())
            continue
        where = f"{head} [{parent}]" if parent else head
        msg = f"{field}: {text}" if field else text
        lines.append(f"{where} {msg}".strip())
    return lines
