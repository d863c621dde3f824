"""The pluggy PluginManager: built-in plugins, lazy entry points, recipe-named modules.

Built-in plugins are ordinary plugins found by :mod:`mtlkit.discovery` (every module under
``mtlkit.plugins`` that defines a hook implementation); one that fails to import is an
error. Third-party plugins are loaded lazily (on the first registry access, or when the
CLI collects its commands) from the ``mtlkit`` entry-point group, unless
``MTLKIT_LOAD_ENTRY_POINTS=0``. An entry-point plugin that fails to import, that pluggy
refuses (an unknown hook) or whose hook raises is left out with a one-line warning (and
its traceback under ``--debug``), recorded in ``failed_plugins`` and reported by
``mtlkit plugins``; commands that do not need it go on. A plugin a recipe names must
load: the same faults are a one-line PluginError naming it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

import pluggy

from . import hookspecs
from .discovery import builtin_plugin_modules
from .errors import MtlkitError, PluginError, did_you_mean
from .registry import KINDS, Registry

ENTRY_POINT_GROUP = "mtlkit"

# `mtlkit --debug` sets this: a recipe's plugin that fails then raises its own exception,
# traceback and all, instead of the one-line PluginError (the loader gathers those into
# one report, which would lose the traceback).
DEBUG = False

# hook name -> component kind
HOOK_KINDS: dict[str, str] = {
    "register_backbones": "backbone",
    "register_heads": "head",
    "register_attention": "attention",
    "register_weightings": "weighting",
    "register_tasks": "task",
    "register_datasets": "dataset",
    "register_loggers": "logger",
}
assert set(HOOK_KINDS.values()) == set(KINDS)

# every hook a plugin may implement (components, CLI commands, compare columns)
HOOK_NAMES: tuple[str, ...] = tuple(n for n in vars(hookspecs) if n.startswith("register_"))

T = TypeVar("T")


class MtlkitPluginManager:
    """Wraps ``pluggy.PluginManager`` with lazy loading and a cached registry."""

    def __init__(self, load_entry_points: bool | None = None) -> None:
        self.pm = pluggy.PluginManager("mtlkit")
        self.pm.add_hookspecs(hookspecs)
        self.failed_plugins: dict[str, str] = {}
        self.sources: dict[str, str] = {}  # plugin name -> "builtin" | "entry point" | "recipe" | "api"
        self.files: dict[str, str] = {}  # plugin name -> the .py file a recipe named (for messages)
        if load_entry_points is None:
            load_entry_points = os.environ.get("MTLKIT_LOAD_ENTRY_POINTS", "1") != "0"
        self._want_entry_points = load_entry_points
        self._entry_points_loaded = False
        self._registry: Registry | None = None
        for module in builtin_plugin_modules(debug=DEBUG):
            self.register(module, name=module.__name__, source="builtin")

    # -- loading -----------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None, source: str = "api") -> str:
        """Register a plugin object or module; returns its name. A plugin that pluggy refuses
        (an unknown hook, a hook with the wrong arguments, registered twice) is left out and
        raises a one-line PluginError naming it."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self.pm.has_plugin(name):
            return name
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.has_plugin(name):  # check_pending fails after registering: undo it
                self.pm.unregister(name=name)
            raise PluginError(f"plugin '{name}': {_validation_message(exc)}") from exc
        self.sources[name] = source
        self._registry = None
        return name

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
            self.sources.pop(name, None)
            self._registry = None

    def load_entry_points(self) -> None:
        if self._entry_points_loaded or not self._want_entry_points:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name, source="entry point")
            except Exception as exc:  # a broken third-party plugin must not break every command
                self._record_failure(ep.name, exc)

    def load_module(self, spec: str, where: str = "plugins") -> str:
        """Load a plugin named in a recipe: a dotted module name or a path to a .py file.

        Unlike built-ins, a recipe's plugin is required: failure raises a one-line PluginError.
        """
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise PluginError(f"{where}: plugin file '{spec}' does not exist")
            name = f"mtlkit_user_plugin_{path.stem}"
            if self.pm.has_plugin(name):
                return name
            try:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:  # SystemExit: a plugin that runs a script's main()
                sys.modules.pop(name, None)
                if DEBUG:
                    raise
                raise PluginError(f"{where}: plugin '{spec}' failed to import: {_one_line(exc)}") from exc
            self.files[name] = str(path)
            return self._register_named(module, name, where, spec)
        if self.pm.has_plugin(spec):
            return spec
        try:
            module = importlib.import_module(spec)
        except (Exception, SystemExit) as exc:
            if DEBUG:
                raise
            raise PluginError(f"{where}: plugin '{spec}' failed to import: {_one_line(exc)}") from exc
        return self._register_named(module, spec, where, spec)

    def _register_named(self, module: Any, name: str, where: str, spec: str) -> str:
        try:
            return self.register(module, name=name, source="recipe")
        except PluginError as exc:
            if DEBUG and exc.__cause__ is not None:
                raise exc.__cause__
            raise PluginError(f"{where}: plugin '{spec}': {str(exc).split(': ', 1)[1]}") from exc.__cause__

    def _record_failure(self, name: str, exc: BaseException) -> None:
        self.failed_plugins[name] = _one_line(exc)
        # One line, once: the plugin's components will be missing (`mtlkit plugins` lists it);
        # its author, under --debug, also gets the traceback of where it failed.
        if DEBUG:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"warning: plugin '{name}' failed to load ({self.failed_plugins[name]}); "
              f"its components are unavailable", file=sys.stderr)

    # -- the registry ------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        self.load_entry_points()
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        return self.collect(self._try_build_registry)

    def collect(self, build: Callable[[], T]) -> T:
        """``build()``, which calls hooks through :meth:`call_each`. An entry-point plugin
        whose hook fails is left out (like one that fails to import) and ``build`` runs
        again without it, so nothing it registered before failing is kept; any other
        plugin's failure is an error."""
        while True:
            try:
                return build()
            except _HookFailed as failed:
                source = self.sources.get(failed.plugin)
                if source in ("entry point", "recipe"):  # not left behind to fail every later lookup
                    self.unregister(failed.plugin)
                if source != "entry point":
                    if DEBUG and failed.__cause__ is not None:
                        raise failed.__cause__
                    raise PluginError(str(failed)) from failed.__cause__
                self._record_failure(failed.plugin, failed.__cause__ or failed)

    def call_each(self, hook_name: str, make_register: Callable[[str], Callable[..., None]]) -> None:
        """Call every implementation of ``hook_name`` on its own, in registration order, with
        ``register=make_register(plugin_name)``, so that whatever it registers knows its
        plugin. A failure names the plugin (use within :meth:`collect`)."""
        # pluggy lists implementations in registration order (and calls them in reverse):
        # built-ins first, so a later plugin that reuses a built-in's name is the one refused.
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                impl.function(register=make_register(plugin_name))
            except MtlkitError as exc:  # e.g. a duplicate name: already one line naming the plugin
                raise _HookFailed(plugin_name, str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - named and reported as one line
                label = self.files.get(plugin_name, plugin_name)
                raise _HookFailed(plugin_name, f"plugin '{label}': {hook_name} failed: {_one_line(exc)}") from exc

    def _try_build_registry(self) -> Registry:
        registry = Registry()
        for hook_name, kind in HOOK_KINDS.items():
            def make_register(plugin_name: str, _kind: str = kind) -> Callable[..., None]:
                def register(name, factory, params=None, description=None, tiny=None):
                    registry.register(_kind, name, factory, params=params, description=description,
                                      plugin=plugin_name, tiny=tiny)

                return register

            self.call_each(hook_name, make_register)
        return registry

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per plugin (loaded or failed), for ``mtlkit plugins``."""
        registry = self.registry
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            comps = [c for c in registry.list() if c.plugin == name]
            rows.append({"name": name, "source": self.sources.get(name, "?"), "hooks": hooks,
                         "components": [f"{c.kind}:{c.name}" for c in comps], "error": None})
        for name, err in self.failed_plugins.items():
            rows.append({"name": name, "source": "failed", "hooks": [], "components": [], "error": err})
        return rows


class _HookFailed(Exception):
    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(message)
        self.plugin = plugin


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # e.g. a SyntaxError's or pluggy's multi-line message
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _validation_message(exc: BaseException) -> str:
    """pluggy's message, on one line and without the module's repr (the name says it)."""
    names = ", ".join(HOOK_NAMES)
    text = " ".join(str(exc).split())
    if text.startswith("unknown hook "):
        hook = text.split("'")[1] if "'" in text else text
        return f"unknown hook '{hook}'{did_you_mean(hook, HOOK_NAMES)} (hooks: {names})"
    return text


_MANAGER: MtlkitPluginManager | None = None


def get_plugin_manager() -> MtlkitPluginManager:
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = MtlkitPluginManager()
    return _MANAGER


def reset_plugin_manager(load_entry_points: bool | None = None) -> MtlkitPluginManager:
    """A fresh manager (tests use this to isolate plugins)."""
    global _MANAGER
    _MANAGER = MtlkitPluginManager(load_entry_points=load_entry_points)
    return _MANAGER


def get_registry() -> Registry:
    return get_plugin_manager().registry


def get_component(kind: str, name: str):
    return get_registry().get(kind, name)
