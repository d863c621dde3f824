"""Finding the built-in plugins without a hand-kept list.

Every module under ``mtlkit.plugins`` that defines at least one hook implementation is a
built-in plugin: adding one is adding its file. Modules whose own name starts with ``_``
are private helpers and are not imported here (their plugin imports them); a public
module without hook implementations (say, a renderer its data set uses) is imported and
left out.

A built-in that fails to import is an error, not a plugin silently missing: otherwise the
user would only later read "unknown backbone" with no hint of why.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType

from .errors import PluginError
from .hookspecs import hookimpl

BUILTIN_PACKAGE = "mtlkit.plugins"

_IMPL_MARK = f"{hookimpl.project_name}_impl"  # the attribute pluggy's marker sets on a hook implementation


def builtin_plugin_modules(package: str | None = None, debug: bool = False) -> list[ModuleType]:
    """The plugin modules under ``package`` (default ``mtlkit.plugins``), in path order
    (sorted within each folder).

    A module that fails to import raises a one-line PluginError naming it, or with
    ``debug`` its own exception (and traceback).
    """
    return [module for module in _walk(package or BUILTIN_PACKAGE, debug) if defines_hookimpl(module)]


def defines_hookimpl(module: ModuleType) -> bool:
    """Whether ``module`` itself defines a hook implementation (one it merely imported from
    another module does not count: that module is the plugin)."""
    return any(getattr(obj, _IMPL_MARK, None) is not None and getattr(obj, "__module__", None) == module.__name__
               for obj in vars(module).values())


def _walk(package: str, debug: bool) -> Iterator[ModuleType]:
    pkg = _import(package, debug)
    yield pkg
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[1].startswith("_"):
            continue
        if info.ispkg:
            yield from _walk(info.name, debug)
        else:
            yield _import(info.name, debug)


def _import(name: str, debug: bool) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # SystemExit: a module that runs a script's main()
        if debug:
            raise
        text = " ".join(str(exc).split())
        raise PluginError(f"built-in plugin '{name}' failed to import: {type(exc).__name__}"
                          f"{': ' + text if text else ''} (mtlkit --debug shows the traceback)") from exc
