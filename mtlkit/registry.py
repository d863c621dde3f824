"""One registry per component kind: name -> (factory, params model, description, plugin)."""

from __future__ import annotations

import fnmatch
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, MtlkitError, PluginError, UnknownComponentError, did_you_mean

KINDS: tuple[str, ...] = ("backbone", "head", "attention", "weighting", "task", "dataset", "logger")


class Params(BaseModel):
    """Base of every params model and recipe section: unknown keys are errors, and no float
    field takes NaN or +-inf (they pass every bound but fail, or silently diverge, at run time).
    A number field takes no true/false and no text, a true/false field no number and no text:
    TOML values carry their type, and pydantic's lax mode would read ``batch_size = true`` as
    1 and ``epochs = "3"`` as 3 (see :func:`scalar_mismatch`).

    A registered params model that does not subclass this one gets the finite rule anyway
    (see :func:`finite_params`), so third-party plugins follow it too.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _typed_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name) if info.field_name else None
        problem = scalar_mismatch(field_info.annotation, value) if field_info is not None else None
        if problem:
            raise PydanticCustomError("scalar_type", problem)
        return value


class NoParams(Params):
    """The params model of a component that takes no parameters."""


_NUMBERS = frozenset({int, float})


def _scalar_leaves(annotation: Any) -> set[type] | None:
    """The scalar types a field's annotation admits (Literal values by their type), or None
    when it admits anything else too (text-like types, models, containers, Any)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_leaves(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin is typing.Union or (origin is None and type(annotation).__name__ == "UnionType"):
        leaves: set[type] = set()
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            sub = _scalar_leaves(arg)
            if sub is None:
                return None
            leaves |= sub
        return leaves
    if annotation in (int, float, bool, str):
        return {annotation}
    return None


def scalar_mismatch(annotation: Any, value: Any) -> str | None:
    """Why ``value`` may not fill a field of ``annotation``, or None: true/false where only
    numbers (or text) go, text where only numbers or true/false go, a number where only
    true/false go. Fields that admit other types (paths, models, lists, Any) are not judged."""
    leaves = _scalar_leaves(annotation)
    if not leaves:
        return None
    admits = " or ".join(sorted({"a number" if t in _NUMBERS else "true/false" if t is bool else "text"
                                 for t in leaves}))
    if isinstance(value, bool):
        return None if bool in leaves else f"expected {admits}, got {str(value).lower()}"
    if isinstance(value, str):
        return None if str in leaves else f"expected {admits}, got the text {value!r}"
    if isinstance(value, (int, float)) and bool in leaves and not leaves & _NUMBERS:
        return f"expected {admits}, got the number {value!r}"  # lax mode reads 0 and 1 as false and true
    if isinstance(value, int) and int in leaves and not -2 ** 63 <= value < 2 ** 63:
        # TOML integers are unbounded; torch and numpy take seeds and sizes as 64-bit integers
        return f"{value} is beyond a 64-bit integer (at most {2 ** 63 - 1})"
    return None


def finite_params(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` and the pydantic models its fields nest, made to refuse NaN and +-inf."""
    done: dict[type, bool] = {}

    def visit(m: type[BaseModel]) -> bool:  # True if m's schema changed
        if m in done:
            return done[m]
        done[m] = False
        nested = [visit(t) for f in m.model_fields.values() for t in _nested_types(f.annotation)]
        changed = m.model_config.get("allow_inf_nan", True) is not False
        if changed or any(nested):
            m.model_config["allow_inf_nan"] = False
            m.model_rebuild(force=True)
        done[m] = changed or any(nested)
        return done[m]

    visit(model)
    return model


def _nested_types(annotation: Any):
    """The pydantic model classes inside an annotation (``list[M]``, ``M | None``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested_types(arg)


# the TOML table that names the one component of a kind (heads, tasks and data sets may be several)
_TABLES = {"backbone": "model.backbone", "attention": "model.attention", "weighting": "weighting"}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownComponentError(
            f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)} (kinds: {', '.join(KINDS)})"
        )
    return kind


def first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


# context every factory of a kind must take; optional context (e.g. task_names for
# backbones) is passed only to factories whose signature accepts it
_REQUIRED_CONTEXT = {"head": ("in_channels", "task"), "attention": ("backbone", "heads", "tasks"),
                     "weighting": ("task_names",), "task": ("name",), "dataset": ("split",)}


def _accepted_kwargs(factory: Any) -> set[str] | None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return set(sig.parameters)


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel] = NoParams
    description: str = ""
    plugin: str = "?"
    # params of a tiny CPU variant for tests (None: the defaults are tiny already); for a
    # component that reads files (a data set's published layout), a function that writes a
    # tiny copy of that layout under the folder it is given and returns the params to read it
    tiny: dict | Callable[[Any], dict] | None = None

    def validate_params(self, params: dict | BaseModel | None = None, where: str = "") -> BaseModel:
        """Validate raw params against this component's model; one-line error on failure naming
        ``[where.params]`` (``where``: the component's TOML table, by default its kind's one)."""
        if isinstance(params, self.params):
            return params
        try:
            return self.params.model_validate(dict(params or {}))
        except ValidationError as exc:
            from .recipe.errors import format_validation_errors

            table = where or _TABLES.get(self.kind)
            lines = format_validation_errors(exc, prefix="" if table else f"{self.kind} '{self.name}' params",
                                             model=self.params, location=f"{table}.params" if table else "")
            raise ConfigError("; ".join(lines)) from None

    def build(self, params: dict | BaseModel | None = None, *, where: str = "", **context: Any) -> Any:
        """Validate ``params`` and call the factory with the kind's context: the one build path.

        Optional context (e.g. ``task_names`` for backbones, ``in_stride`` for heads) reaches
        only factories whose signature takes it; the kind's required context always does. A
        factory's ValueError/TypeError becomes one ConfigError naming ``where`` (the recipe
        table). A head's raw output gets its task's output activation here, so a head never
        has to apply it itself.
        """
        validated = self.validate_params(params, where=where)
        accepted = _accepted_kwargs(self.factory)
        if accepted is not None:
            context = {k: v for k, v in context.items() if k in accepted or k in _REQUIRED_CONTEXT.get(self.kind, ())}
        try:
            built = self.factory(validated, **context)
        except MtlkitError:
            raise
        except (ValueError, TypeError) as exc:
            table = where or _TABLES.get(self.kind) or self.kind
            raise ConfigError(f"[{table}] {self.kind} '{self.name}': {exc}") from exc
        except (MemoryError, RuntimeError) as exc:  # sizes beyond the machine: torch's allocator says so
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc):
                raise
            table = where or _TABLES.get(self.kind) or self.kind
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"[{table}] {self.kind} '{self.name}': too large to build on this machine "
                              f"({first})") from exc
        if self.kind == "head" and "task" in context:
            from .contracts import attach_output_activation

            attach_output_activation(built, context["task"])
        return built

    def param_summary(self) -> str:
        parts = []
        for fname, finfo in self.params.model_fields.items():
            default = "required" if finfo.is_required() else repr(finfo.get_default(call_default_factory=True))
            parts.append(f"{fname}={default}")
        return ", ".join(parts)


@dataclass
class Registry:
    """All registered components, by kind then name."""

    components: dict[str, dict[str, Component]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, component: Component) -> None:
        check_kind(component.kind)
        existing = self.components[component.kind].get(component.name)
        if existing is not None:
            raise PluginError(
                f"duplicate {component.kind} '{component.name}': registered by plugin "
                f"'{existing.plugin}' and by plugin '{component.plugin}'"
            )
        self.components[component.kind][component.name] = component

    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        params: type[BaseModel] | None = None,
        description: str | None = None,
        plugin: str = "?",
        tiny: dict | Callable[[Any], dict] | None = None,
    ) -> Component:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {kind} without a name")
        if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"plugin '{plugin}': params of {kind} '{name}' must be a pydantic model class")
        component = Component(
            kind=kind,
            name=name,
            factory=factory,
            params=finite_params(params) if params is not None else NoParams,
            description=description if description is not None else first_doc_line(factory),
            plugin=plugin,
            tiny=tiny,
        )
        self.add(component)
        return component

    def get(self, kind: str, name: str) -> Component:
        check_kind(kind)
        try:
            return self.components[kind][name]
        except KeyError:
            hint = did_you_mean(name, self.components[kind])
            raise UnknownComponentError(
                f"unknown {kind} '{name}'{hint} (run 'mtlkit list {kind}' to see them)"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[check_kind(kind)])

    def list(self, kind: str | None = None, pattern: str = "*") -> list[Component]:
        kinds = KINDS if kind is None else (check_kind(kind),)
        out = []
        for k in kinds:
            for name in sorted(self.components[k]):
                if fnmatch.fnmatchcase(name, pattern):
                    out.append(self.components[k][name])
        return out
