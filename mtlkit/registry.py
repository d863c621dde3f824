"""One registry per component kind: name -> (factory, params model, description, plugin)."""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, PluginError, UnknownComponentError, did_you_mean

KINDS: tuple[str, ...] = ("backbone", "head", "attention", "weighting", "task", "dataset")


class NoParams(BaseModel):
    """The params model of a component that takes no parameters."""

    model_config = ConfigDict(extra="forbid")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownComponentError(
            f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)} (kinds: {', '.join(KINDS)})"
        )
    return kind


def first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


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
        """Validate raw params against this component's model; one-line error on failure."""
        if isinstance(params, self.params):
            return params
        try:
            return self.params.model_validate(dict(params or {}))
        except ValidationError as exc:
            from .recipe.errors import format_validation_errors

            lines = format_validation_errors(exc, prefix=where or f"{self.kind} '{self.name}' params", model=self.params)
            raise ConfigError("; ".join(lines)) from None

    def build(self, params: dict | BaseModel | None = None, **context: Any) -> Any:
        """Validate ``params`` and call the factory with the kind's context.

        A head's raw output gets its task's output activation here (the one build path
        every head goes through), so a head never has to apply it itself.
        """
        built = self.factory(self.validate_params(params), **context)
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
            params=params or NoParams,
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
