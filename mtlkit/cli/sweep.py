"""``mtlkit sweep``: run recipes over a grid of overrides, then compare the runs."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from ..errors import ConfigError
from ..rundir import check_run_dir


def register_commands(register) -> None:
    register("sweep", sweep_command, configure=_configure,
             help="run recipes x a grid of overrides, then compare them")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", help="recipe files or built-in names")
    p.add_argument("--grid", action="append", default=[], metavar="KEY[+KEY]=V1,V2",
                   help="values to sweep; keys joined by + take the same value "
                        "(e.g. weighting.name=equal,uncertainty,dwa)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field of every run (TOML value)")
    p.add_argument("--synthetic", action="store_true", help="use the recipes' synthetic stand-in data")
    p.add_argument("--quiet", action="store_true", help="plain progress lines")
    p.add_argument("--runs-dir", default=None, help="base folder for the run folders")
    p.add_argument("--last", type=int, default=10, help="average the last N evaluations in the table")
    p.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                   help="single-task runs giving the table's Delta_m baselines (as mtlkit compare --baseline)")
    p.add_argument("--out", default=None, help="table prefix (default: RUNS_DIR/sweep)")
    p.add_argument("--dry-run", action="store_true", help="print the runs without training")


def grid_combinations(grid: list[str]) -> list[list[str]]:
    """--grid specs -> one list of --set overrides per combination (cartesian product)."""
    axes = []
    for spec in grid:
        if "=" not in spec:
            raise ConfigError(f"--grid '{spec}': expected KEY[+KEY]=V1,V2,...")
        keys, values = spec.split("=", 1)
        values = [v for v in values.split(",") if v != ""]
        if not values:
            raise ConfigError(f"--grid '{spec}': no values")
        axes.append([[f"{k}={v}" for k in keys.split("+")] for v in values])
    return [sum(combo, []) for combo in itertools.product(*axes)] if axes else [[]]


def sweep_command(args: argparse.Namespace) -> int:
    from ..recipe.loader import load_recipe
    from ..runner import run_recipe
    from .compare import compare_runs

    plan = []
    for spec in args.recipes:
        for overrides in grid_combinations(args.grid):
            all_sets = list(args.set) + overrides
            loaded = load_recipe(spec, overrides=all_sets, synthetic=args.synthetic)  # validate all first
            values = [o.split("=", 1)[1].strip("'\"") for o in overrides]
            tag = "-".join(dict.fromkeys(values))  # keys swept together share one value
            plan.append((spec, all_sets, f"{loaded.name}{'-' + tag if tag else ''}"))
    for b in args.baseline:  # before any run: a missing baseline must not waste a sweep
        check_run_dir(Path(b))
    for spec, sets, name in plan:
        print(f"{name}: {spec} {' '.join('--set ' + s for s in sets)}")
    if args.dry_run:
        return 0
    runs_dir = Path(args.runs_dir or "runs")
    finished = []
    for spec, sets, name in plan:
        result = run_recipe(spec, overrides=sets, synthetic=args.synthetic, run_dir=runs_dir / "sweep" / name,
                            quiet=args.quiet)
        print(f"run folder: {result.run_dir}")
        finished.append(result.run_dir)
    return compare_runs(finished, last=args.last, baselines=args.baseline,
                        out=args.out or str(runs_dir / "sweep" / "compare"))
