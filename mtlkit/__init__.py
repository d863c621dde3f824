"""mtlkit: a modular plugin toolkit for multi-task learning in PyTorch."""

from __future__ import annotations

from .hookspecs import hookimpl
from .plugin_manager import get_plugin_manager, get_registry

__version__ = "0.1.0"

__all__ = ["hookimpl", "compose", "Trainer", "load_recipe", "list_components", "build_parts",
           "run_recipe", "build_trainer", "RunResult", "get_registry", "get_plugin_manager", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import mtlkit` stays light for the CLI's fast commands.
    if name == "compose":
        from .build import compose
        return compose
    if name == "build_parts":
        from .build import build_parts
        return build_parts
    if name == "Trainer":
        from .engine import Trainer
        return Trainer
    if name == "load_recipe":
        from .recipe.loader import load_recipe
        return load_recipe
    if name in ("run_recipe", "build_trainer", "RunResult"):  # `mtlkit run` as Python
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'mtlkit' has no attribute '{name}'")


def list_components(kind: str | None = None, pattern: str = "*"):
    """Registered components (optionally of one kind, names matching a glob)."""
    return get_registry().list(kind, pattern)
