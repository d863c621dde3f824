"""``mtlkit sweep``: run recipes over a grid of overrides, then compare the runs.

Every check is made before the first run trains (and by ``--dry-run``): each combination's
recipe loads and passes what ``mtlkit run`` checks before it writes (model, data, weighting,
first sample), the run names are plain, distinct folder names whose folders do not exist
yet, ``--last``, ``--baseline`` and ``--out`` are usable. A bad combination found after
others had trained would leave a partial sweep folder that a rerun cannot write into.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

from ..errors import ConfigError, MtlkitError, prefixed
from ..fsprobe import creation_obstacle
from ..rundir import check_run_dir, precheck_new_run_dir


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
    p.add_argument("--out", default=None, help="table prefix (default: RUNS_DIR/sweep/compare)")
    p.add_argument("--dry-run", action="store_true", help="print the runs without training")


def _key(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split("=", 1)[0].split("."))


def _covers(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    return inner[:len(outer)] == outer


def grid_combinations(grid: list[str], sets: list[str] = ()) -> list[list[str]]:
    """--grid specs -> one list of --set overrides per combination (cartesian product).
    A key swept twice (or inside another swept key), or one the --grid would overwrite a
    --set of, is refused: one of the two would be silently ignored."""
    axes, swept = [], {}
    for spec in grid:
        if "=" not in spec:
            raise ConfigError(f"--grid '{spec}': expected KEY[+KEY]=V1,V2,...")
        keys, values = spec.split("=", 1)
        values = [v for v in values.split(",") if v != ""]
        if not values:
            raise ConfigError(f"--grid '{spec}': no values")
        for k in keys.split("+"):
            key = _key(k)
            if not all(key):
                raise ConfigError(f"--grid '{spec}': empty key")
            for other, other_spec in swept.items():
                if _covers(other, key) or _covers(key, other):
                    same = "is swept twice" if other == key else f"overlaps '{'.'.join(other)}'"
                    raise ConfigError(f"--grid '{spec}': key '{'.'.join(key)}' {same} "
                                      f"(also in --grid '{other_spec}'); give each key once")
            for s in sets:
                if _covers(key, _key(s)):
                    raise ConfigError(f"--grid '{spec}': key '{'.'.join(key)}' would overwrite --set {s}")
            swept[key] = spec
        axes.append([[f"{k}={v}" for k in keys.split("+")] for v in values])
    return [sum(combo, []) for combo in itertools.product(*axes)] if axes else [[]]


def _tag(overrides: list[str]) -> str:
    """The run-name suffix of a combination: its values (once for keys swept together), with
    anything that could not stand in one folder name (separators, '..') replaced by '_'."""
    values = [o.split("=", 1)[1].strip().strip("'\"") for o in overrides]
    tag = "-".join(dict.fromkeys(values))
    return re.sub(r"\.\.+", "_", re.sub(r"[^\w.+=-]+", "_", tag))


def _check_out(out: str | Path) -> None:
    """The table's files (``out``.md, ``out``.csv) can be written: not folders, and their
    folder exists or can be made (the sweep makes it once the runs are done)."""
    from .compare import table_files

    for path in table_files(out):
        if path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a folder")
    obstacle = creation_obstacle(Path(out).parent)
    if obstacle is not None:
        raise ConfigError(f"--out {out}: cannot write there, {obstacle}")


def plan_sweep(args: argparse.Namespace, runs_dir: Path) -> list[tuple[str, list[str], str, object]]:
    """``(recipe, overrides, run name, loaded recipe)`` per run, after every check."""
    from ..preflight import prepare
    from ..recipe.loader import load_recipe

    if args.last < 1:
        raise ConfigError(f"sweep --last: {args.last}, expected at least 1")
    combos = grid_combinations(args.grid, args.set)
    for b in args.baseline:  # before any run: a missing baseline must not waste a sweep
        check_run_dir(Path(b))
    plan, errors, names = [], [], {}
    for spec in args.recipes:
        for overrides in combos:
            loaded = load_recipe(spec, overrides=list(args.set), grid=overrides, synthetic=args.synthetic)
            tag = _tag(overrides)
            name = f"{loaded.name}{'-' + tag if tag else ''}"
            given = f"{spec}{''.join(' --grid ' + o for o in overrides)}"
            label = f"sweep run {name} ({given})"
            if name in names:
                errors.append(f"sweep: run name '{name}' twice ({names[name]}; {given}): each run needs its own "
                              f"name, which the swept values give")
                continue
            names[name] = given
            try:
                precheck_new_run_dir(runs_dir / "sweep" / name)
                prepare(loaded, probe=True)  # what `mtlkit run` checks before it writes anything
            except MtlkitError as exc:
                errors += [f"{label}: {line}" for line in str(exc).splitlines()]
            plan.append((spec, list(args.set) + overrides, name, loaded))
    if errors:
        raise ConfigError("\n".join(errors))
    _check_out(args.out if args.out else runs_dir / "sweep" / "compare")
    return plan


def sweep_command(args: argparse.Namespace) -> int:
    from ..runner import run_recipe
    from .compare import compare_runs

    runs_dir = Path(args.runs_dir or "runs")
    plan = plan_sweep(args, runs_dir)
    for spec, sets, name, _ in plan:
        print(f"{name}: {spec} {' '.join('--set ' + s for s in sets)}")
    if args.dry_run:
        return 0
    finished = []
    for spec, sets, name, loaded in plan:
        try:
            result = run_recipe(loaded, run_dir=runs_dir / "sweep" / name, quiet=args.quiet)
        except MtlkitError as exc:  # which combination failed (the finished ones were printed)
            given = f"{spec}{''.join(' --grid ' + o for o in sets[len(args.set):])}"  # as the checks name it
            raise prefixed(f"sweep run {name} ({given}): ", exc) from None
        print(f"run folder: {result.run_dir}")
        finished.append(result.run_dir)
    out = Path(args.out) if args.out else runs_dir / "sweep" / "compare"
    out.parent.mkdir(parents=True, exist_ok=True)
    return compare_runs(finished, last=args.last, baselines=args.baseline, out=str(out))
