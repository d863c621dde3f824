"""Sub-commands beyond run/validate/show: list, plugins, params, sweep, plot, data, decathlon
(compare: :mod:`mtlkit.cli_compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from .cli import COMMANDS, EXTRA_PARSERS, check_run_dir, command, console
from .errors import ConfigError


def _add_parsers(sub) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("kind", nargs="?")
    p.add_argument("glob", nargs="?")
    sub.add_parser("plugins", help="list loaded plugins")

    p = sub.add_parser("params", help="parameter counts and the paper's #P column")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")

    p = sub.add_parser("sweep", help="run recipes x a grid of overrides, then compare them")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--grid", action="append", default=[], metavar="KEY[+KEY]=V1,V2",
                   help="values to sweep; keys joined by + take the same value "
                        "(e.g. weighting.name=equal,uncertainty,dwa)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--runs-dir", default=None)
    p.add_argument("--last", type=int, default=10)
    p.add_argument("--out", default=None, help="table prefix (default: RUNS_DIR/sweep)")
    p.add_argument("--dry-run", action="store_true", help="print the runs without training")

    p = sub.add_parser("plot", help="training curves and prediction panels (PNG) in the run folder")
    p.add_argument("run")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--attention", action="store_true", help="also draw each task's attention masks")
    p.add_argument("--levels", default="0,4,9", help="attention levels to draw (comma separated)")

    p = sub.add_parser("data", help="write synthetic data sets in the real layouts")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("synth-scenes", help="synthetic indoor scenes in the NYUv2 (or CityScapes) layout")
    q.add_argument("out")
    q.add_argument("--n", type=int, default=200, help="training images")
    q.add_argument("--n-val", type=int, default=None, help="validation images (default: n/4)")
    q.add_argument("--height", type=int, default=None)
    q.add_argument("--width", type=int, default=None)
    q.add_argument("--num-classes", type=int, default=13)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--layout", choices=["nyuv2", "cityscapes"], default="nyuv2")
    q = dsub.add_parser("synth-decathlon", help="ten synthetic domains in the official Decathlon layout")
    q.add_argument("out")
    q.add_argument("--n-train", type=int, default=64)
    q.add_argument("--n-val", type=int, default=16)
    q.add_argument("--n-test", type=int, default=16)
    q.add_argument("--image-size", type=int, default=72)
    q.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("decathlon", help="Visual Decathlon tools")
    dsub = p.add_subparsers(dest="decathlon_command", required=True)
    q = dsub.add_parser("submit", help="write the test-set predictions as the server's results.json in a zip")
    q.add_argument("run")
    q.add_argument("--out", help="zip path (default: RUN/submission.zip)")
    q.add_argument("--checkpoint", choices=["best", "last"], default="best")


EXTRA_PARSERS.append(_add_parsers)


# -- list / plugins ----------------------------------------------------------------------
@command("list")
def cmd_list(args) -> int:
    from .plugin_manager import get_registry
    from .registry import KINDS

    kind, pattern = args.kind, args.glob or "*"
    if kind is not None and kind not in KINDS:
        # `mtlkit list seg*` means a glob over all kinds
        kind, pattern = None, kind if args.glob is None else args.glob
    rows = get_registry().list(kind, pattern)
    table = Table(title="mtlkit components")
    for col in ("name", "kind", "plugin", "description", "parameters"):
        table.add_column(col, overflow="fold")
    for c in rows:
        table.add_row(c.name, c.kind, c.plugin.removeprefix("mtlkit.plugins."), c.description, c.param_summary())
    console().print(table)
    return 0


@command("plugins")
def cmd_plugins(args) -> int:
    from .plugin_manager import get_plugin_manager

    table = Table(title="mtlkit plugins")
    for col in ("plugin", "source", "components", "status"):
        table.add_column(col, overflow="fold")
    for row in get_plugin_manager().plugin_rows():
        status = f"[red]failed: {row['error']}[/red]" if row["error"] else "ok"
        table.add_row(row["name"], row["source"], ", ".join(row["components"]), status)
    console().print(table)
    return 0


# -- params ------------------------------------------------------------------------------
@command("params")
def cmd_params(args) -> int:
    from .build import build_model, params_ratio
    from .recipe.loader import load_recipe

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
        del model
    for spec, arch, total, ratio, paper_ratio in rows:
        table.add_row(str(spec), arch, f"{total:,}", f"{ratio:.3f}", "" if paper_ratio is None else f"{paper_ratio:g}")
    console().print(table)
    return 0


# -- sweep -------------------------------------------------------------------------------
def grid_combinations(grid: list[str]) -> list[list[str]]:
    """--grid specs -> one list of --set overrides per combination (cartesian product)."""
    import itertools

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


@command("sweep")
def cmd_sweep(args) -> int:
    from .recipe.loader import load_recipe

    plan = []
    for spec in args.recipes:
        for overrides in grid_combinations(args.grid):
            all_sets = list(args.set) + overrides
            loaded = load_recipe(spec, overrides=all_sets, synthetic=args.synthetic)  # validate all first
            values = [o.split("=", 1)[1].strip("'\"") for o in overrides]
            tag = "-".join(dict.fromkeys(values))  # keys swept together share one value
            plan.append((spec, all_sets, f"{loaded.name}{'-' + tag if tag else ''}"))
    for spec, sets, name in plan:
        print(f"{name}: {spec} {' '.join('--set ' + s for s in sets)}")
    if args.dry_run:
        return 0
    runs_dir = Path(args.runs_dir or "runs")
    finished = []
    for spec, sets, name in plan:
        run_dir = runs_dir / "sweep" / name
        ns = argparse.Namespace(recipe=spec, set=sets, synthetic=args.synthetic, resume=None, quiet=args.quiet,
                                runs_dir=None, run_dir=str(run_dir), debug=False)
        rc = COMMANDS["run"](ns)
        if rc != 0:
            return rc
        finished.append(str(run_dir))
    out = args.out or str(runs_dir / "sweep" / "compare")
    return COMMANDS["compare"](argparse.Namespace(runs=finished, last=args.last, baseline=[], out=out,
                                                  csv=None, markdown=None))


# -- plot --------------------------------------------------------------------------------
@command("plot")
def cmd_plot(args) -> int:
    from .plots import plot_run

    run = check_run_dir(Path(args.run))
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    for path in plot_run(run, n_images=args.images, attention=args.attention, levels=levels):
        print(path)
    return 0


# -- data --------------------------------------------------------------------------------
@command("data")
def cmd_data(args) -> int:
    if args.data_command == "synth-scenes":
        from .plugins.datasets import synthetic_scenes

        n_val = args.n_val if args.n_val is not None else max(1, args.n // 4)
        if args.layout == "nyuv2":
            h, w = args.height or 288, args.width or 384
            synthetic_scenes.write_nyuv2_layout(args.out, args.n, n_val, height=h, width=w,
                                                num_classes=args.num_classes, seed=args.seed)
        else:
            h, w = args.height or 128, args.width or 256
            synthetic_scenes.write_cityscapes_layout(args.out, args.n, n_val, height=h, width=w, seed=args.seed)
        print(f"wrote {args.n} train + {n_val} val scenes ({h}x{w}, {args.layout} layout) to {args.out}")
        return 0
    if args.data_command == "synth-decathlon":
        from .plugins.datasets import synthetic_decathlon

        synthetic_decathlon.write_decathlon_layout(args.out, args.n_train, args.n_val, args.n_test,
                                                   image_size=args.image_size, seed=args.seed)
        print(f"wrote ten synthetic domains (official layout) to {args.out}")
        return 0
    raise ConfigError(f"unknown data command '{args.data_command}'")


# -- decathlon ---------------------------------------------------------------------------
@command("decathlon")
def cmd_decathlon(args) -> int:
    from .decathlon_submit import submit_run

    run = check_run_dir(Path(args.run))
    out = Path(args.out) if args.out else run / "submission.zip"
    n = submit_run(run, out, checkpoint=args.checkpoint)
    print(f"wrote {n} predictions to {out}")
    return 0
