"""``mtlkit run``, ``validate`` and ``show``: the commands that take one recipe."""

from __future__ import annotations

import argparse

from rich.table import Table

from ..rundir import is_rank_zero
from .output import console


def register_commands(register) -> None:
    register("run", run_command, configure=_configure_run, help="train a recipe")
    register("validate", validate_command, configure=recipe_arguments, help="check a recipe")
    register("show", show_command, configure=recipe_arguments,
             help="print the resolved recipe and parameter counts")


def recipe_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("recipe", nargs=None if required else "?", help="recipe file or built-in name")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a field (TOML value)")
    p.add_argument("--synthetic", action="store_true", help="use the recipe's synthetic stand-in data")


def _configure_run(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="plain progress lines")
    p.add_argument("--runs-dir", help="base folder for run folders (default: the recipe's output.dir)")
    p.add_argument("--run-dir", help="exact run folder to create")
    p.add_argument("--logger", action="append", metavar="NAME", default=[],
                   help="also log to this logger (`mtlkit list logger`); log.jsonl is always written")


def run_command(args: argparse.Namespace) -> int:
    from ..runner import run_recipe

    # Contradicting arguments (RECIPE with --resume, --run-dir with --runs-dir...) are refused there.
    result = run_recipe(args.recipe, overrides=args.set or [], synthetic=args.synthetic,
                        run_dir=args.run_dir, runs_dir=args.runs_dir, resume=args.resume, quiet=args.quiet,
                        loggers=args.logger)
    if is_rank_zero():
        print(f"run folder: {result.run_dir}")
    return 0


def _load(args: argparse.Namespace):
    from ..recipe.loader import load_recipe

    return load_recipe(args.recipe, overrides=args.set or [], synthetic=args.synthetic)


def validate_command(args: argparse.Namespace) -> int:
    from ..preflight import prepare

    loaded = _load(args)
    prepare(loaded, probe=True)  # every check `run` makes before training
    print(f"{args.recipe}: ok ({len(loaded.recipe.tasks)} tasks, "
          f"{'many-to-many' if loaded.recipe.many_to_many else 'one-to-many'})")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from ..build import build_model, parameter_counts

    loaded = _load(args)
    out = console()
    out.print(loaded.toml(), markup=False)
    model, _ = build_model(loaded.recipe)
    table = Table(title="parameters per part")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in parameter_counts(model).items():
        table.add_row(part, f"{n:,}")
    out.print(table)
    return 0
