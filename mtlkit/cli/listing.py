"""``mtlkit list``, ``plugins`` and ``params``: what is registered, and how big models are."""

from __future__ import annotations

import argparse

from rich.table import Table

from .output import console


def register_commands(register) -> None:
    register("list", list_command, configure=_configure_list, help="list registered components")
    register("plugins", plugins_command, help="list loaded plugins")
    register("params", params_command, configure=_configure_params,
             help="parameter counts and the paper's #P column")


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", help="a component kind (backbone, head, attention, weighting, task, "
                   "dataset, logger), or a glob over every kind")
    p.add_argument("glob", nargs="?", help="names to show, e.g. 'seg*'")


def _configure_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe files or built-in names")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a field (TOML value)")


def list_command(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, did_you_mean
    from ..plugin_manager import get_registry
    from ..registry import KINDS

    registry = get_registry()
    kind, pattern = args.kind, args.glob or "*"
    if kind is not None and kind not in KINDS:
        # `mtlkit list seg*` (or `mtlkit list mtan`) means a glob over all kinds; a word that is
        # neither a glob nor a component's name, or a second word after it, is a misspelt kind
        names = {c.name for c in registry.list(None, "*")}
        if args.glob is not None or not (any(ch in kind for ch in "*?[") or kind in names):
            if args.glob is not None:
                raise ConfigError(f"list: unknown kind '{kind}'{did_you_mean(kind, KINDS)} "
                                  f"(kinds: {', '.join(KINDS)})")
            hint = did_you_mean(kind, KINDS) or did_you_mean(kind, names)
            raise ConfigError(f"list: '{kind}' is neither a component kind nor a component's name{hint} "
                              f"(kinds: {', '.join(KINDS)}; a glob such as '{kind}*' searches the names)")
        kind, pattern = None, kind
    rows = registry.list(kind, pattern)
    table = Table(title="mtlkit components")
    for col in ("name", "kind", "plugin", "description", "parameters"):
        table.add_column(col, overflow="fold")
    for c in rows:
        table.add_row(c.name, c.kind, c.plugin.removeprefix("mtlkit.plugins."), c.description, c.param_summary())
    console().print(table)
    return 0


def plugins_command(args: argparse.Namespace) -> int:
    from ..plugin_manager import get_plugin_manager

    table = Table(title="mtlkit plugins")
    for col in ("plugin", "source", "provides", "status"):
        table.add_column(col, overflow="fold")
    for row in get_plugin_manager().plugin_rows():
        status = f"[red]failed: {row['error']}[/red]" if row["error"] else "ok"
        # a plugin of commands or compare columns registers no component: name its hooks
        provides = ", ".join(row["components"]) or ", ".join(row["hooks"])
        table.add_row(row["name"], row["source"], provides, status)
    console().print(table)
    return 0


def params_command(args: argparse.Namespace) -> int:
    from ..build import build_model, params_ratio
    from ..recipe.loader import load_recipe

    table = Table(title="parameters (#P relative to one single-task network)")
    for col in ("recipe", "architecture", "parameters", "#P", "paper #P"):
        table.add_column(col, justify="right" if col != "recipe" else "left")
    rows = []
    for spec in args.recipes:
        loaded = load_recipe(spec, overrides=args.set or [])
        recipe = loaded.recipe
        model, tasks = build_model(recipe)
        total = sum(p.numel() for p in model.parameters())
        paper = recipe.paper
        ratio = params_ratio(recipe, model, tasks)
        rows.append((spec, paper.architecture if paper else "", total, ratio, paper.params_ratio if paper else None))
        del model  # full-size models: one at a time
    for spec, arch, total, ratio, paper_ratio in rows:
        table.add_row(str(spec), arch, f"{total:,}", f"{ratio:.3f}", "" if paper_ratio is None else f"{paper_ratio:g}")
    console().print(table)
    return 0
