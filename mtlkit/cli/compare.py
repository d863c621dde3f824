"""``mtlkit compare``: a paper-style table of several runs (means of their last N
evaluations, #P, Delta_m against baseline runs, and the columns plugins add through the
``register_compare_columns`` hook)."""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape
from rich.table import Table

from ..errors import CheckpointError, ConfigError, MtlkitError, PluginError, os_reason
from ..atomic import atomic_write_text, promote, remove_quietly
from ..rundir import RUN_FOLDER_ENTRIES, check_run_dir, read_log
from .output import console


def register_commands(register) -> None:
    register("compare", compare_command, configure=_configure, help="paper-style table of several runs")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders (folders without an evaluation yet are skipped, with a note)")
    p.add_argument("--last", type=int, default=10,
                   help="average the last N evaluations (the paper: 10), or as many as a run has")
    p.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR",
                   help="single-task runs giving Delta_m baselines (one per task)")
    p.add_argument("--out", metavar="PREFIX", help="also write PREFIX.md and PREFIX.csv")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")


def compare_command(args: argparse.Namespace) -> int:
    return compare_runs(args.runs, last=args.last, baselines=args.baseline, out=args.out, csv_path=args.csv,
                        markdown_path=args.markdown)


# -- plugin columns --------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    value: Callable[[dict[str, Any]], Any]
    fmt: str
    note: str
    plugin: str

    def cell(self, summary: dict[str, Any]) -> str | None:
        from .. import plugin_manager

        try:
            v = self.value(summary)
        except MtlkitError:
            raise
        except Exception as exc:  # a plugin's bug: one line naming it (--debug: its traceback)
            if plugin_manager.DEBUG:
                raise
            raise PluginError(f"plugin '{self.plugin}': compare column '{self.name}' failed on "
                              f"{summary['run']}: {type(exc).__name__}: {exc}") from exc
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return v if isinstance(v, str) else self.fmt.format(v)


def compare_columns(pm: Any = None) -> list[Column]:
    """Every plugin's extra columns, in registration order."""
    from ..plugin_manager import get_plugin_manager

    pm = pm or get_plugin_manager()

    def once() -> list[Column]:
        columns: list[Column] = []

        def registrar(plugin: str):
            def register(name: str, value: Callable[[dict[str, Any]], Any], fmt: str = "{:.4g}",
                         note: str = "") -> None:
                if not isinstance(name, str) or not name or not callable(value):
                    raise PluginError(f"plugin '{plugin}': compare column needs a name and a callable value")
                clash = next((c for c in columns if c.name == name), None)
                if clash is not None:
                    raise PluginError(f"plugin '{plugin}': compare column '{name}' is already registered "
                                      f"by plugin '{clash.plugin}'")
                columns.append(Column(name, value, fmt, note, plugin))

            return register

        pm.call_each("register_compare_columns", registrar)
        return columns

    return pm.collect(once)


# -- summaries -------------------------------------------------------------------------------
def run_summary(run: Path, last: int) -> dict[str, Any]:
    """Mean of the last N evaluations (or of all, when fewer) of every metric, with
    directions, #P and the recipe (what plugin columns read: see ``register_compare_columns``)."""
    from ..build import build_model, params_ratio
    from ..recipe.loader import load_recipe

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
        "run": str(run), "name": row_name(run, loaded.name), "recipe": recipe, "many_to_many": recipe.many_to_many,
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


def _summaries(runs: Sequence[str | Path], last: int) -> list[dict[str, Any]]:
    summaries, skipped = [], []
    for r in runs:
        try:
            summaries.append(run_summary(Path(r), last))
        except MtlkitError as exc:  # e.g. runs/NAME/* holding a run still in its first epoch
            skipped.append((r, exc))
    if not summaries:
        if len(skipped) == 1:
            raise skipped[0][1]
        raise CheckpointError(f"compare: none of the {len(runs)} run folders has an evaluation to compare "
                              f"(first: {str(skipped[0][1]).splitlines()[0]})")
    for r, exc in skipped:
        msg = str(exc).splitlines()[0]
        print(f"note: skipped: {msg}" if str(r) in msg else f"note: skipped {r}: {msg}", file=sys.stderr)
    names = [s["name"] for s in summaries]
    for s in summaries:
        if names.count(s["name"]) > 1:
            s["name"] = s["run"]
    return summaries


# -- the table -------------------------------------------------------------------------------
def compare_runs(runs: Sequence[str | Path], last: int = 10, baselines: Sequence[str | Path] = (),
                 out: str | None = None, csv_path: str | None = None, markdown_path: str | None = None) -> int:
    """Print the table of ``runs``; write it where asked (``out``: PREFIX.md and PREFIX.csv)."""
    from ..delta_m import delta_m

    if last < 1:
        raise ConfigError(f"compare --last: {last}, expected at least 1")
    # Files only where asked: a table printed in a folder must not leave files behind.
    targets = []
    if out:
        md, csv_file = table_files(out)
        targets += [(md, "md", "--out"), (csv_file, "csv", "--out")]
    if markdown_path:
        targets.append((Path(markdown_path), "md", "--markdown"))
    if csv_path:
        targets.append((Path(csv_path), "csv", "--csv"))
    check_targets(targets, [*runs, *baselines])
    summaries = _summaries(runs, last)
    baseline: dict[str, dict[str, float]] = {}
    for b in baselines:
        for task, values in run_summary(Path(b), last)["metrics"].items():
            baseline.setdefault(task, values)
    metric_columns: list[tuple[str, str]] = []
    for s in summaries:
        for task, values in s["metrics"].items():
            metric_columns += [(task, name) for name in values if (task, name) not in metric_columns]
    extra = compare_columns()
    cells = {c.name: [c.cell(s) for s in summaries] for c in extra}
    extra = [c for c in extra if any(v is not None for v in cells[c.name])]  # columns no run has are left out
    header = ["run", "architecture", "weighting", "#P", "evals"] + [f"{t}/{m}" for t, m in metric_columns]
    header += [c.name for c in extra] + (["delta_m%"] if baseline else [])
    rows = []
    for i, s in enumerate(summaries):
        row = [s["name"], s["architecture"], s["weighting"], f"{s['params_ratio']:.3f}", str(s["evaluations"])]
        row += [_fmt(s["metrics"].get(t, {}).get(m)) for t, m in metric_columns]
        row += [cells[c.name][i] or "-" for c in extra]
        if baseline:
            common = {t: v for t, v in s["metrics"].items() if t in baseline}
            dm = delta_m(common, {t: baseline[t] for t in common},
                         {t: s["higher_is_better"][t] for t in common}) if common else float("nan")
            row.append(f"{dm:+.2f}")
        rows.append(row)
        paper = _paper_row(s, metric_columns, extra, len(header))
        if paper is not None:
            rows.append(paper)
    counts = sorted({s["evaluations"] for s in summaries})
    title = (f"mean of the last {counts[0]} evaluation{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else
             f"mean of the last {counts[0]} to {counts[-1]} evaluations (column evals: per run)")
    notes = [c.note for c in extra if c.note]
    if any(s["recipe"].paper is not None and s["recipe"].paper.metrics for s in summaries):
        notes.append("rows '(paper)': the numbers the recipe's [paper] block quotes, under its protocol")
    if notes:
        title += "; " + "; ".join(notes)
    # Many domains x (accuracy, loss) do not fit a terminal: the printed table leaves the
    # losses of many-to-many runs' tasks out (the written files keep every column).
    hidden = {f"{t}/loss" for s in summaries if s["many_to_many"] for t in s["metrics"]}
    _print(title, header, rows, hidden)
    md = [title, ""] if notes else []  # a column's note explains it in the file too
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_all([(path, "\n".join(md) + "\n" if kind == "md" else buf.getvalue()) for path, kind, _ in targets])
    if targets:
        print("wrote " + " and ".join(str(p) for p, _, _ in targets))
    return 0


# -- the written files -----------------------------------------------------------------------
def table_files(out: str | os.PathLike) -> tuple[Path, Path]:
    """PREFIX.md and PREFIX.csv of the table prefix ``out`` (--out): the suffixes are appended
    (``t.v2`` gives ``t.v2.md``, not ``t.md``; a given ``.md`` or ``.csv`` is taken off first).
    A prefix that names a folder (``.``, ``..``, ``dir/``, an existing folder) is refused."""
    text = os.fspath(out)
    prefix = Path(text)
    if text.endswith(("/", os.sep)) or prefix.name in ("", ".", "..") or prefix.is_dir():
        raise ConfigError(f"--out {text}: names a folder; give a file name prefix (the table is written to "
                          f"PREFIX.md and PREFIX.csv), e.g. {Path(text, 'table')}")
    if prefix.suffix in (".md", ".csv"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")


def check_targets(targets: list[tuple[Path, str, str]], runs: Sequence[str | Path]) -> None:
    """Before any run is read: two outputs at one path, an output that is a folder or a run
    folder's own file, or one whose folder is missing, are one-line errors."""
    seen: dict[str, str] = {}
    protected = {os.path.realpath(Path(r) / name) for r in runs for name in RUN_FOLDER_ENTRIES}
    checkpoints = [Path(os.path.realpath(Path(r) / "checkpoints")) for r in runs]
    for path, _, flag in targets:
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"compare {seen[real]} and {flag}: both would write {path}; give each its own path")
        seen[real] = flag
        if real in protected or any(c == Path(real) or c in Path(real).parents for c in checkpoints):
            raise ConfigError(f"compare {flag}: {path} is a file of a run folder being compared; "
                              f"refusing to overwrite it")
        if path.is_dir():
            raise CheckpointError(f"{path}: cannot write, it is a folder")
        if not path.parent.is_dir():
            raise CheckpointError(f"{path}: cannot write, no folder {path.parent}")


def write_all(files: list[tuple[Path, str]]) -> None:
    """Every file appears whole, or none does: each is written in full (the atomic writer)
    under a temp name beside it (``.NAME.<random>.tmp``), then all are renamed into place."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            staged.append((tmp, path))
            try:
                atomic_write_text(tmp, text)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot write ({os_reason(exc)})") from None
        for tmp, path in staged:
            promote(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            remove_quietly(tmp)
        raise


def _paper_row(s: dict[str, Any], metric_columns: list[tuple[str, str]], extra: list[Column],
               width: int) -> list[str] | None:
    """The paper's numbers for a run's recipe, in the run's columns ('-' where the paper has
    none); plugin columns (e.g. the Decathlon score) are computed from the paper's metrics."""
    paper = s["recipe"].paper
    if paper is None or not paper.metrics:
        return None
    protocol = paper.protocol if isinstance(paper.protocol, str) else \
        ", ".join(f"{t}: {p}" for t, p in paper.protocol.items())
    name = f"{s['name']} (paper{'; ' + protocol if protocol else ''})"
    ratio = f"{paper.params_ratio:.3f}" if paper.params_ratio is not None else "-"
    row = [name, paper.architecture or s["architecture"], paper.weighting or s["weighting"], ratio, "-"]
    row += [_fmt(paper.metrics.get(t, {}).get(m)) for t, m in metric_columns]
    quoted = {**s, "metrics": {t: dict(v) for t, v in paper.metrics.items()}}
    row += [c.cell(quoted) or "-" for c in extra]
    return row + ["-"] * (width - len(row))  # no Delta_m for the paper's row


def _print(title: str, header: list[str], rows: list[list[str]], hidden: set[str]) -> None:
    # rich would read '[paper]' (or a run named '[x]') as markup and drop it
    table = Table(title=escape(title))
    shown = [i for i, h in enumerate(header) if h not in hidden]
    for i in shown:
        h = header[i]
        table.add_column(escape(h), justify="left" if h in ("run", "architecture", "weighting") else "right")
    for row in rows:
        table.add_row(*(escape(row[i]) for i in shown))
    console().print(table)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
