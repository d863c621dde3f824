"""Turn pydantic validation errors into located one-line messages with hints."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ValidationError

from ..errors import did_you_mean


def _field_names(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names valid at ``loc``'s parent, walking nested pydantic models."""
    current = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in getattr(current, "model_fields", {}):
            return []
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(getattr(current, "model_fields", {})) if current is not None else []


def format_validation_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                             location: str = "", origin: Callable[[str], str | None] | None = None) -> list[str]:
    """One message per error: ``prefix [a.b] field: message``.

    ``location`` is the TOML table the validated data sits at (``weighting.params``);
    ``origin(path)`` may name what set the field at that dotted path (a ``--set``), which
    then stands in for ``prefix``.
    """
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err.get("loc", ()))
        field = loc[-1] if loc else ""
        parent = ".".join(p for p in (location, *loc[:-1]) if p)
        source = origin(".".join(p for p in (location, *loc) if p)) if origin is not None and loc else None
        head = f"{source}:" if source else prefix
        where = f"{head} [{parent}]" if parent else head
        if err.get("type") == "extra_forbidden":
            hint = did_you_mean(field, _field_names(model, loc))
            msg = f"{field}: unknown field{hint}"
        else:
            text = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            msg = f"{field}: {text}" if field else text
        lines.append(f"{where} {msg}".strip())
    return lines
