"""``mtlkit compare``: a paper-style table of several runs (means of their last N
evaluations, #P, Delta_m against baseline runs, the Decathlon score)."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from .cli import EXTRA_PARSERS, check_run_dir, command, console, write_text_file
from .errors import CheckpointError, ConfigError, MtlkitError
from .rundir import read_log


def _add_parser(sub) -> None:
    p = sub.add_parser("compare", help="paper-style table of several runs")
    p.add_argument("runs", nargs="+", help="run folders (folders without an evaluation yet are skipped, with a note)")
    p.add_argument("--last", type=int, default=10,
                   help="average the last N evaluations (the paper: 10), or as many as a run has")
    p.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                   help="single-task runs giving Delta_m baselines (one per task)")
    p.add_argument("--out", metavar="PREFIX", help="also write PREFIX.md and PREFIX.csv")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")


EXTRA_PARSERS.append(_add_parser)


def run_summary(run: Path, last: int) -> dict[str, Any]:
    """Mean of the last N evaluations (or of all, when fewer) of every metric, with
    directions and #P."""
    from .build import build_model, params_ratio
    from .recipe.loader import load_recipe

    check_run_dir(run)
    evals = [r for r in read_log(run) if r.get("type") == "eval" and isinstance(r.get("metrics"), dict)]
    if not evals:
        raise CheckpointError(f"{run}: no evaluation in log.jsonl yet")
    loaded = load_recipe(run / "recipe.toml")
    chosen = evals[-last:]
    metrics: dict[str, dict[str, float]] = {}
    for task, values in chosen[-1]["metrics"].items():
        metrics[task] = {}
        for name in values:
            vals = [e["metrics"][task][name] for e in chosen if name in e["metrics"].get(task, {})]
            vals = [v for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]
            metrics[task][name] = sum(vals) / len(vals) if vals else float("nan")
    model, tasks = build_model(loaded.recipe)
    directions = {t: dict(task.metrics().higher_is_better) for t, task in tasks.items()}
    recipe = loaded.recipe
    return {
        "run": str(run), "name": row_name(run, loaded.name), "decathlon": decathlon_domains(recipe),
        "architecture": recipe.paper.architecture if recipe.paper and recipe.paper.architecture else recipe.model.attention.name,
        "weighting": recipe.weighting.name, "params": sum(p.numel() for p in model.parameters()),
        "params_ratio": params_ratio(recipe, model, tasks),
        "metrics": metrics, "higher_is_better": directions, "evaluations": len(chosen),
    }


def row_name(run: Path, recipe_name: str) -> str:
    """A row names its run: ``NAME/<start time>`` for a run under runs/NAME/, else the
    run folder's name (several runs of one recipe must not share a row name)."""
    path = Path(os.path.abspath(run))
    return f"{recipe_name}/{path.name}" if path.parent.name == recipe_name else path.name


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

    if args.last < 1:
        raise ConfigError(f"compare --last: {args.last}, expected at least 1")
    summaries, skipped = [], []
    for r in args.runs:
        try:
            summaries.append(run_summary(Path(r), args.last))
        except MtlkitError as exc:  # e.g. runs/NAME/* holding a run still in its first epoch
            skipped.append((r, exc))
    if not summaries:
        if len(skipped) == 1:
            raise skipped[0][1]
        raise CheckpointError(f"compare: none of the {len(args.runs)} run folders has an evaluation to compare "
                              f"(first: {str(skipped[0][1]).splitlines()[0]})")
    for r, exc in skipped:
        msg = str(exc).splitlines()[0]
        print(f"note: skipped: {msg}" if str(r) in msg else f"note: skipped {r}: {msg}", file=sys.stderr)
    baseline: dict[str, dict[str, float]] = {}
    for b in args.baseline:
        s = run_summary(Path(b), args.last)
        for task, values in s["metrics"].items():
            baseline.setdefault(task, values)
    names = [s["name"] for s in summaries]
    for s in summaries:
        if names.count(s["name"]) > 1:
            s["name"] = s["run"]
    columns: list[tuple[str, str]] = []
    for s in summaries:
        for task, values in s["metrics"].items():
            for name in values:
                if (task, name) not in columns:
                    columns.append((task, name))
    header = ["run", "architecture", "weighting", "#P", "evals"] + [f"{t}/{m}" for t, m in columns]
    decathlon = any(s.get("decathlon") for s in summaries)
    if decathlon:
        header += ["mean", "score"]
    if baseline:
        header.append("delta_m%")
    rows = []
    for s in summaries:
        row = [s["name"], s["architecture"], s["weighting"], f"{s['params_ratio']:.3f}", str(s["evaluations"])]
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
    counts = sorted({s["evaluations"] for s in summaries})
    title = (f"mean of the last {counts[0]} evaluation{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else
             f"mean of the last {counts[0]} to {counts[-1]} evaluations (column evals: per run)")
    if decathlon:
        title += ("; mean: top-1 accuracy (%) averaged over the domains; score: the Decathlon score over "
                  "the domains present, from these accuracies and the real data's baseline errors "
                  "(meaningful on real data only)")
    table = Table(title=title)
    # Ten domains x (accuracy, loss) do not fit a terminal: the printed table leaves the
    # Decathlon tasks' losses out (the written files keep every column).
    hidden = {f"{t}/loss" for s in summaries for t in (s.get("decathlon") or {})}
    shown = [i for i, h in enumerate(header) if h not in hidden]
    for i in shown:
        h = header[i]
        table.add_column(h, justify="left" if h in ("run", "architecture", "weighting") else "right")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console().print(table)
    md = [title, ""] if decathlon else []
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    # Files only where asked: a table printed in a folder must not leave files behind.
    targets = []
    if args.out:
        targets += [(Path(args.out).with_suffix(".md"), "md"), (Path(args.out).with_suffix(".csv"), "csv")]
    if getattr(args, "markdown", None):
        targets.append((Path(args.markdown), "md"))
    if getattr(args, "csv", None):
        targets.append((Path(args.csv), "csv"))
    for path, kind in targets:
        write_text_file(path, "\n".join(md) + "\n" if kind == "md" else buf.getvalue())
    if targets:
        print("wrote " + " and ".join(str(p) for p, _ in targets))
    return 0


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
