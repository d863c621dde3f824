"""TOML -> validated Recipe: every error at once, each with its file and TOML location."""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from ..errors import ConfigError, MtlkitError, did_you_mean, os_reason
from ..plugin_manager import get_plugin_manager
from .errors import format_validation_errors
from .paper import paper_checks
from .checks import cross_checks, located, logger_paths, plugin_list
from .schema import Recipe
from .toml_writer import dumps


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path | None
    resolved: dict[str, Any] = field(default_factory=dict)  # params filled in with defaults

    @property
    def name(self) -> str:
        if self.recipe.name:
            return self.recipe.name
        return self.path.stem if self.path else "recipe"

    def toml(self) -> str:
        return dumps(self.resolved)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved, sort_keys=True).encode()).hexdigest()


def builtin_recipes() -> dict[str, Path]:
    """Shipped recipes by name: 'quickstart', 'nyuv2/mtan', ..."""
    root = Path(str(resources.files("mtlkit.recipes")))
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.toml"))}


def find_recipe(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    shipped = builtin_recipes()
    key = str(spec).removesuffix(".toml").removeprefix("recipes/")
    if key in shipped:
        return shipped[key]
    if path.is_dir():
        raise ConfigError(f"recipe '{spec}' is a folder: give a recipe file (.toml) or a built-in recipe's name")
    raise ConfigError(
        f"recipe '{spec}' not found: no such file and no built-in recipe of that name"
        f"{did_you_mean(key, shipped)} (built-in: {', '.join(shipped) or 'none'})"
    )


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"{flag} '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{flag} '{text}': empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings: --set model.attention.name=mtan
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], flag: str = "--set") -> dict[str, Any]:
    """Set each KEY.PATH=VALUE. A new ``name`` for a component drops the old component's
    ``params`` (they were its own), so that any params of the new one come from overrides.
    ``flag`` names where the overrides came from in error messages (--set, --grid)."""
    data = copy.deepcopy(data)
    parsed = [(text, *parse_override(text, flag)) for text in overrides]
    components = {location: ref for _, location, ref in _raw_component_refs(data)}
    for _, keys, value in parsed:
        ref = components.get(".".join(keys[:-1]))
        if keys[-1] == "name" and ref is not None and ref.get("name") != value:
            ref.pop("params", None)
    for text, keys, value in parsed:
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{flag} '{text}': '{k}' is not a table")
            node = nxt
        node[keys[-1]] = value
    return data


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {os_reason(exc)}") from None
    except UnicodeDecodeError as exc:  # e.g. a binary file, or a run folder's damaged recipe.toml
        raise ConfigError(f"{path}: not a TOML text file (not UTF-8 at byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None


def _raw_component_refs(raw: dict[str, Any]):
    """(kind, toml location, table) for every component table the raw recipe names."""

    def table(d: Any, key: str) -> dict | None:
        v = d.get(key) if isinstance(d, dict) else None
        return v if isinstance(v, dict) else None

    model = table(raw, "model") or {}
    for key, kind in (("backbone", "backbone"), ("attention", "attention"), ("head", "head")):
        if table(model, key) is not None:
            yield kind, f"model.{key}", model[key]
    for t, ref in (table(model, "heads") or {}).items():
        if isinstance(ref, dict):
            yield "head", f"model.heads.{t}", ref
    data_refs = []
    for t, ref in (table(raw, "tasks") or {}).items():
        if isinstance(ref, dict):
            yield "task", f"tasks.{t}", ref
            if table(ref, "data") is not None:
                data_refs.append((f"tasks.{t}.data", ref["data"]))
    if table(raw, "data") is not None:
        data_refs.append(("data", raw["data"]))
    for location, ref in data_refs:
        yield "dataset", location, ref
        if table(ref, "synthetic") is not None:
            yield "dataset", f"{location}.synthetic", ref["synthetic"]
    weighting = table(raw, "weighting")
    yield "weighting", "weighting", weighting if weighting is not None else {"name": "equal"}
    loggers = raw.get("loggers") if isinstance(raw, dict) else None
    for i, ref in enumerate(loggers if isinstance(loggers, list) else []):
        if isinstance(ref, dict):
            yield "logger", f"loggers.{i}", ref


def override_origin(overrides: list[tuple[str, str]], base: Any = None) -> Callable[[str], str | None]:
    """``origin(path)``: the last override (``(flag, text)``: ``--set``, ``--grid``) that wrote
    the field at a dotted TOML path (or a table holding it, or, when the recipe file ``base``
    lacks the field, a key inside it: ``--set nonexist.x=1`` made ``nonexist``), for error
    messages; None when the recipe file did."""
    written = []
    for flag, text in overrides:
        try:
            written.append((f"{flag} {text}", parse_override(text, flag)[0]))
        except ConfigError:
            continue

    def in_file(parts: list[str]) -> bool:
        node = base
        for p in parts:
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            elif isinstance(node, dict) and p in node:
                node = node[p]
            else:
                return False
        return True

    def origin(path: str) -> str | None:
        parts = path.split(".")
        for source, keys in reversed(written):
            if parts[:len(keys)] == keys or (keys[:len(parts)] == parts and not in_file(parts)):
                return source
        return None

    return origin


def _set_path(d: dict[str, Any], location: str, value: Any) -> None:
    node = d
    for k in location.split("."):
        node = node[int(k)] if isinstance(node, list) else node[k]
    node["params"] = value


def add_loggers(raw: dict[str, Any], names: list[str], origin: Callable[[str], str | None]):
    """``raw`` with the loggers ``mtlkit run --logger NAME`` adds (after the recipe's own, or
    the default; one already listed is not added twice), and ``origin`` naming those flags."""
    if not names:
        return raw, origin
    raw = copy.deepcopy(raw)
    listed = raw.get("loggers", [ref.model_dump() for ref in Recipe.model_fields["loggers"].get_default(
        call_default_factory=True)])
    if not isinstance(listed, list):
        return raw, origin  # the schema names the problem
    added = {}
    for name in names:
        if not any(isinstance(ref, dict) and ref.get("name") == name for ref in listed):
            added[f"loggers.{len(listed)}"] = f"--logger {name}"
            listed = [*listed, {"name": name}]
    raw["loggers"] = listed

    def with_flags(path: str) -> str | None:
        flag = next((f for loc, f in added.items() if path == loc or path.startswith(loc + ".")), None)
        return flag or origin(path)

    return raw, with_flags


def use_synthetic(data: dict[str, Any]) -> dict[str, Any]:
    """Swap every data set that names a ``synthetic`` stand-in for that stand-in."""
    data = copy.deepcopy(data)
    refs = []
    if isinstance(data.get("data"), dict):
        refs.append(data["data"])
    for task in (data.get("tasks") or {}).values():
        if isinstance(task, dict) and isinstance(task.get("data"), dict):
            refs.append(task["data"])
    found = False
    for ref in refs:
        stand_in = ref.pop("synthetic", None)
        if stand_in:
            found = True
            ref["name"] = stand_in.get("name")
            ref["params"] = stand_in.get("params", {})
    if not found:
        raise ConfigError("--synthetic: the recipe names no [data.synthetic] stand-in data set")
    overrides = data.pop("synthetic_overrides", []) or []
    if not isinstance(overrides, list):
        raise ConfigError("synthetic_overrides: expected a list of KEY.PATH=VALUE strings")
    return apply_overrides(data, [str(o) for o in overrides], "synthetic_overrides")


def load_recipe(spec: str | Path | dict, overrides: list[str] | None = None, synthetic: bool = False,
                loggers: list[str] | None = None, grid: list[str] | None = None) -> LoadedRecipe:
    """Read, override, validate. Raises ConfigError listing every problem, one per line.
    ``loggers``: names of loggers to add (``mtlkit run --logger NAME``); ``grid``: overrides
    applied after ``overrides``, named ``--grid`` in errors (``mtlkit sweep``)."""
    if isinstance(spec, dict):
        path, raw, where = None, spec, "<recipe>"
    else:
        path = find_recipe(spec)
        raw, where = read_toml(path), str(spec) if Path(spec).is_file() else str(path)
    if synthetic:  # the stand-in's own overrides first, so that --set still wins
        raw = use_synthetic(raw)
    base = raw
    raw = apply_overrides(apply_overrides(raw, overrides or []), grid or [], "--grid")
    origin = override_origin([("--set", o) for o in overrides or []] + [("--grid", o) for o in grid or []], base)

    pm = get_plugin_manager()
    errors: list[str] = []
    plugins = plugin_list(raw, where, origin)
    plugin_where = f"{origin('plugins')}:" if origin("plugins") else where
    for plugin in plugins:
        spec_text = plugin
        if path is not None and (spec_text.endswith(".py") or "/" in spec_text):
            spec_text = str((path.parent / spec_text).resolve()) if not Path(spec_text).is_absolute() else spec_text
        try:
            pm.load_module(spec_text, where=f"{plugin_where} [plugins] {plugin}")
        except MtlkitError as exc:
            errors.append(str(exc))

    recipe = None
    raw, origin = add_loggers(raw, list(loggers or []), origin)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors.extend(format_validation_errors(exc, prefix=where, model=Recipe, origin=origin))

    # Component names and params are checked on the raw data too, so that one report
    # lists every problem even when the recipe's own structure has errors.
    registry = pm.registry
    resolved = recipe.model_dump(mode="json", exclude_none=True) if recipe is not None else {}
    for kind, location, ref in _raw_component_refs(raw):
        name, params = ref.get("name"), ref.get("params", {})
        if not isinstance(name, str) or not isinstance(params, dict):
            continue  # the schema errors above already name it
        try:
            component = registry.get(kind, name)
        except MtlkitError as exc:
            errors.append(located(where, origin, location, "name", str(exc)))
            continue
        try:
            validated = component.params.model_validate(params)
        except ValidationError as exc:
            errors.extend(format_validation_errors(exc, prefix=where, model=component.params,
                                                   location=f"{location}.params", origin=origin))
            continue
        if recipe is not None:
            _set_path(resolved, location, validated.model_dump(mode="json", exclude_none=True))
    if recipe is None:
        raise ConfigError("\n".join(errors))

    errors.extend(cross_checks(recipe, where, origin))
    errors.extend(logger_paths(resolved, where, origin))
    errors.extend(paper_checks(recipe, where, registry, origin))
    if errors:
        raise ConfigError("\n".join(errors))
    return LoadedRecipe(recipe=recipe, path=path, resolved=resolved)
