"""Turn pydantic validation errors into located one-line messages with hints."""

from __future__ import annotations

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


def format_validation_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """One message per error: ``prefix [a.b] field: message``."""
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = str(loc[-1]) if loc else ""
        parent = ".".join(str(p) for p in loc[:-1])
        where = f"{prefix} [{parent}]" if parent else prefix
        if err.get("type") == "extra_forbidden":
            hint = did_you_mean(field, _field_names(model, loc))
            msg = f"{field}: unknown field{hint}"
        else:
            msg = f"{field}: {err.get('msg', 'invalid')}" if field else err.get("msg", "invalid")
        lines.append(f"{where} {msg}".strip())
    return lines
