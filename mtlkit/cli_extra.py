"""Sub-commands beyond run/validate/show: params, compare, plot, data, decathlon."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from .cli import COMMANDS, EXTRA_PARSERS, atomic_write_text, check_run_dir, command, console
from .errors import CheckpointError, ConfigError


def _add_parsers(sub) -> None:
    p = sub.add_parser("params", help="parameter counts and the paper's #P column")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")

    p = sub.add_parser("compare", help="paper-style table of several runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--last", type=int, default=10, help="average the last N evaluations (the paper: 10)")
    p.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                   help="single-task runs giving Delta_m baselines (one per task)")
    p.add_argument("--out", help="write OUT.md and OUT.csv (default: compare.md/.csv in the current folder)")

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


# -- compare -----------------------------------------------------------------------------
def read_log(run: Path) -> list[dict[str, Any]]:
    log = run / "log.jsonl"
    if not log.is_file():
        raise CheckpointError(f"{run}: not a run folder (no log.jsonl)")
    records = []
    for i, line in enumerate(log.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckpointError(f"{log}:{i}: not a JSON line") from None
    return records


def run_summary(run: Path, last: int) -> dict[str, Any]:
    """Mean of the last N evaluations of every metric, with directions and #P."""
    from .build import build_model
    from .recipe.loader import load_recipe

    check_run_dir(run)
    loaded = load_recipe(run / "recipe.toml")
    evals = [r for r in read_log(run) if r.get("type") == "eval"]
    if not evals:
        raise CheckpointError(f"{run}: no evaluation in log.jsonl yet")
    chosen = evals[-last:]
    metrics: dict[str, dict[str, float]] = {}
    for task, values in chosen[-1]["metrics"].items():
        metrics[task] = {}
        for name in values:
            vals = [e["metrics"][task][name] for e in chosen if name in e["metrics"].get(task, {})]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            metrics[task][name] = sum(vals) / len(vals) if vals else float("nan")
    model, tasks = build_model(loaded.recipe)
    directions = {t: dict(task.metrics().higher_is_better) for t, task in tasks.items()}
    recipe = loaded.recipe
    return {
        "run": str(run), "name": loaded.name, "decathlon": decathlon_domains(recipe),
        "architecture": recipe.paper.architecture if recipe.paper and recipe.paper.architecture else recipe.model.attention.name,
        "weighting": recipe.weighting.name, "params": sum(p.numel() for p in model.parameters()),
        "params_ratio": sum(p.numel() for p in model.parameters()) / _params_base(recipe, tasks),
        "metrics": metrics, "higher_is_better": directions, "evaluations": len(chosen),
    }


DECATHLON_DATASETS = ("decathlon", "synthetic_decathlon")


def decathlon_domains(recipe) -> dict[str, str] | None:
    """{task: Decathlon domain} for a many-to-many Decathlon run (every task's data set is
    a Decathlon one, or every task is named after a domain), else None. The domain is the
    data set's ``domain`` parameter when it has one, else the task's name."""
    from .decathlon import DOMAINS

    if not recipe.many_to_many:
        return None
    out: dict[str, str] = {}
    for name, task in recipe.tasks.items():
        data = task.data
        domain = data.params.get("domain") if data is not None else None
        if data is not None and data.name in DECATHLON_DATASETS and domain in DOMAINS:
            out[name] = domain
        elif name in DOMAINS:
            out[name] = name
        else:
            return None
    if len(set(out.values())) != len(out):  # two tasks on one domain: no per-domain score
        return None
    return out


def decathlon_columns(s: dict[str, Any]) -> tuple[float, float] | None:
    """(mean top-1 accuracy over the run's domains, Decathlon score over those domains),
    or None when the run is not a Decathlon run or a domain has no accuracy."""
    from .decathlon import decathlon_score

    domains = s.get("decathlon")
    if not domains:
        return None
    acc = {d: s["metrics"].get(t, {}).get("accuracy") for t, d in domains.items()}
    if any(v is None or math.isnan(v) for v in acc.values()):
        return None
    return sum(acc.values()) / len(acc), decathlon_score(acc, kind="accuracy")


@command("compare")
def cmd_compare(args) -> int:
    from .delta_m import delta_m

    summaries = [run_summary(Path(r), args.last) for r in args.runs]
    baseline: dict[str, dict[str, float]] = {}
    for b in args.baseline:
        s = run_summary(Path(b), args.last)
        for task, values in s["metrics"].items():
            baseline.setdefault(task, values)
    columns: list[tuple[str, str]] = []
    for s in summaries:
        for task, values in s["metrics"].items():
            for name in values:
                if (task, name) not in columns:
                    columns.append((task, name))
    header = ["run", "architecture", "weighting", "#P"] + [f"{t}/{m}" for t, m in columns]
    decathlon = any(s.get("decathlon") for s in summaries)
    if decathlon:
        header += ["mean", "score"]
    if baseline:
        header.append("delta_m%")
    rows = []
    for s in summaries:
        row = [s["name"], s["architecture"], s["weighting"], f"{s['params_ratio']:.3f}"]
        row += [_fmt(s["metrics"].get(t, {}).get(m)) for t, m in columns]
        if decathlon:
            cols = decathlon_columns(s)
            row += ["-", "-"] if cols is None else [f"{cols[0]:.2f}", f"{cols[1]:.0f}"]
        if baseline:
            common = {t: v for t, v in s["metrics"].items() if t in baseline}
            dm = delta_m(common, {t: baseline[t] for t in common},
                         {t: s["higher_is_better"][t] for t in common}) if common else float("nan")
            row.append(f"{dm:+.2f}")
        rows.append(row)
    title = f"mean of the last {args.last} evaluations"
    if decathlon:
        title += ("; mean: top-1 accuracy (%) averaged over the domains; score: the Decathlon score over "
                  "the domains present, from these accuracies and the real data's baseline errors "
                  "(meaningful on real data only)")
    table = Table(title=title)
    # Ten domains x (accuracy, loss) do not fit a terminal: the printed table leaves the
    # Decathlon tasks' losses out (OUT.md and OUT.csv keep every column).
    hidden = {f"{t}/loss" for s in summaries for t in (s.get("decathlon") or {})}
    shown = [i for i, h in enumerate(header) if h not in hidden]
    for i in shown:
        h = header[i]
        table.add_column(h, justify="left" if h in ("run", "architecture", "weighting") else "right")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console().print(table)
    out = Path(args.out) if args.out else Path("compare")
    md = [title, ""] if decathlon else []
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


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
    return COMMANDS["compare"](argparse.Namespace(runs=finished, last=args.last, baseline=[], out=out))


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
