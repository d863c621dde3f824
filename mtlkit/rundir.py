"""Run folders: naming, creation, clean-up of a run that never reached a checkpoint, the
folder all torchrun ranks share, writing text files into them and reading a run's log.

A new run's folder is created only after its model, tasks, data and weighting are built
and checked (see :mod:`mtlkit.runner`), and removed again when the run fails before its first
checkpoint: a folder under ``runs/`` is then always a run that can be resumed, compared
and plotted. (The alternative, a hidden folder renamed into place at the first
checkpoint, would need the Trainer to follow the rename of its own run folder and of its
open log file.)
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, DataError, os_reason
from .fsprobe import creation_obstacle, topmost_missing
from .atomic import atomic_write_text  # noqa: F401  (re-exported: the one atomic writer)

# What mtlkit itself writes in a run folder: a logger's file or folder, or a compare table,
# must not be one of them.
RUN_FOLDER_ENTRIES = ("recipe.toml", "results.json", "log.jsonl", "checkpoints", "curves.png",
                      "predictions.png", "attention.png", "submission.zip")


def folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder's name (a run's name), or None: no path separators, no '..'."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or ".." in name or name == "." or "\0" in name or any(s in name for s in seps):
        return (f"'{name}' must be a plain folder name (no path separators or '..'), "
                f"it names the run's folder under the runs folder")
    return None


def run_folder_entry_problem(name: str, what: str = "name") -> str | None:
    """Why ``name`` cannot be a logger's file or folder in the run folder, or None."""
    if not name or name in (".", "..") or any(s in name for s in ("/", "\\", "\0")):
        return f"'{name}' must be a plain {what} (it is made in the run folder)"
    if name.casefold() in RUN_FOLDER_ENTRIES:
        return (f"'{name}' is one of the run folder's own files or folders "
                f"({', '.join(RUN_FOLDER_ENTRIES)}); choose another {what}")
    return None


def check_run_name(name: str, field: str, where: str) -> str:
    """A run name becomes one folder under the runs folder: no separators, no '..'."""
    problem = folder_name_problem(name)
    if problem:
        raise ConfigError(f"{where} {field}: {problem}")
    return name


def new_run_dir(base: str | Path, name: str) -> Path:
    """``base/name/<start time>`` (``-1``, ``-2``, ... when taken); ``name`` is checked."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(base) / name / stamp
    i = 1
    while run.exists():
        run = Path(base) / name / f"{stamp}-{i}"
        i += 1
    # check_run_name keeps it there; this guards any other way a name could climb out.
    if Path(os.path.abspath(base)) not in Path(os.path.abspath(run)).parents:
        raise ConfigError(f"run name '{name}': the run folder {run} would lie outside the runs folder {base}")
    return run


def run_name(loaded) -> str:
    """The folder name a new run gets under the runs folder (checked: one plain name)."""
    where = str(loaded.path) if loaded.path else "<recipe>"
    if loaded.recipe.output.name:
        return check_run_name(loaded.recipe.output.name, "[output] name", where)
    return check_run_name(loaded.name, "name" if loaded.recipe.name else "file name", where)


def pin_for_run_folder(loaded) -> None:
    """What a new run folder's copy of the recipe records so that it means the same when
    resume, compare and plot load it from any folder: recipe-relative plugin files by
    absolute path (the loader's rule: a name ending in .py or holding a '/' is a file next
    to the recipe), and the run's name (else the copy's own file name would be taken)."""
    plugins = loaded.resolved.get("plugins") or []
    if loaded.path is not None and plugins:
        base = loaded.path.resolve().parent
        loaded.resolved["plugins"] = [
            str(base / p) if (p.endswith(".py") or "/" in p) and not Path(p).is_absolute() else p for p in plugins]
    if "name" not in loaded.resolved and loaded.recipe is not None:
        loaded.resolved["name"] = loaded.name


def precheck_new_run_dir(path: Path) -> None:
    """Refuse, before anything is built, a run folder that cannot be made (cheap checks
    only: creating the folder is left until the run is known to start)."""
    if os.path.lexists(path):
        kind = "folder" if path.is_dir() else "file"
        raise CheckpointError(f"run folder {path}: a {kind} of that name already exists "
                              f"(choose a new --run-dir, or --resume a run folder)")
    obstacle = creation_obstacle(path)
    if obstacle is not None:
        raise CheckpointError(f"run folder {path}: cannot be created, {obstacle}")


def create_run_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents); return the top-most folder this created, which
    :func:`discard_unfinished` removes again if the run never saves a checkpoint."""
    top = topmost_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise CheckpointError(f"run folder {path}: already exists") from None
    except (OSError, ValueError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise CheckpointError(f"run folder {path}: cannot be created ({reason})") from None
    return top


def check_run_dir(path: Path) -> Path:
    """``path`` if it is a run folder (a folder holding the run's recipe.toml)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run folder (no such directory)")
    if not (path / "recipe.toml").is_file():
        raise CheckpointError(f"{path}: not a run folder (no recipe.toml)")
    return path


def check_run_files(run: Path) -> None:
    """Refuse a run folder whose recipe.toml, log.jsonl or results.json is there but is not
    a regular file (a folder, a broken link): a run rewrites or appends to them, and would
    fail only at that write, after the run folder was changed."""
    for name in ("recipe.toml", "log.jsonl", "results.json"):
        p = run / name
        if os.path.lexists(p) and not p.is_file():
            kind = "a folder" if p.is_dir() else "a broken link" if p.is_symlink() else "not a file"
            raise CheckpointError(f"{p}: not a regular file ({kind}); the run writes its {name} there")


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job (or a single process): the one that writes run folders."""
    return int(os.environ.get("RANK", "0")) == 0


def agree_on_run_dir(run_dir: Path, device: str) -> Path:
    """Under torchrun every rank must use rank 0's run folder (time stamps may differ)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run_dir
    import torch.distributed as dist

    from .engine.distributed import setup

    setup(device)  # joins the process group (the Trainer reuses it)
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def write_text_file(path: Path, text: str) -> None:
    """atomic_write_text, with a failure (read-only, full disk) as one line naming the file."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({os_reason(exc)})") from None


def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "last.json").is_file()


def discard_unfinished(run: Path, created: Path | None) -> bool:
    """Remove a run folder this process created if it holds no checkpoint (a failure or
    interrupt before the first one), with the parents made for it; True if removed."""
    if created is None or has_checkpoint(run):
        return False
    shutil.rmtree(run, ignore_errors=True)
    parent, top = Path(os.path.abspath(run)).parent, Path(os.path.abspath(created))
    while top == parent or top in parent.parents:
        try:
            parent.rmdir()  # only if empty: a concurrent run may have put its folder there
        except OSError:
            break
        parent = parent.parent
    return True


def read_log(run: Path) -> list[dict[str, Any]]:
    """The records of ``run/log.jsonl``, each checked to have the shape the readers rely on
    (:func:`check_record`). A torn last line (the process died mid-write: not JSON) is
    skipped; any other bad line is a one-line
    :class:`DataError` naming the file and line."""
    log = run / "log.jsonl"
    if not log.is_file():
        raise CheckpointError(f"{run}: not a run folder (no log.jsonl)")
    try:
        data = log.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{log}: cannot read: {os_reason(exc)}") from None
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if i == last:
                break  # torn last line, cut inside a character
            raise DataError(f"{log}:{i + 1}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == last:
                break  # torn last line
            raise DataError(f"{log}:{i + 1}: not a JSON line") from None
        problem = check_record(rec)
        if problem:
            raise DataError(f"{log}:{i + 1}: {problem}")
        records.append(rec)
    return records


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_record(rec: Any) -> str | None:
    """What is wrong with a log record, or None: a JSON object whose ``type`` is a string,
    whose ``epoch`` and ``global_step`` are integers (required in epoch and eval records),
    whose ``losses`` map names to numbers and (eval records) whose ``metrics`` map each task
    to {metric: number}."""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__} {json.dumps(rec)[:40]}"
    kind = rec.get("type")
    if "type" in rec and not isinstance(kind, str):
        return f"field 'type' must be a string, got {json.dumps(kind)[:40]}"
    if kind in ("epoch", "eval") and "epoch" not in rec:
        return f"a record of type '{kind}' has no field 'epoch'"
    for key in ("epoch", "global_step"):
        if key in rec and (not isinstance(rec[key], int) or isinstance(rec[key], bool)):
            return f"field '{key}' must be an integer, got {json.dumps(rec[key])[:40]}"
    losses = rec.get("losses", {})
    if not isinstance(losses, dict) or not all(_number(v) for v in losses.values()):
        return "field 'losses' must map task names to numbers"
    if kind == "eval" or "metrics" in rec:
        metrics = rec.get("metrics")
        if not isinstance(metrics, dict):
            return "an 'eval' record needs field 'metrics', an object {task: {metric: number}}"
        return table_problem(metrics, "metrics")
    return None


def table_problem(table: Any, field: str) -> str | None:
    """What is wrong with the metrics table in ``field`` (of a log record or results.json),
    or None: a JSON object mapping each task to {metric: number or null}."""
    if not isinstance(table, dict):
        return f"field '{field}' must be a table {{task: {{metric: number}}}}, got {json.dumps(table)[:40]}"
    for task, values in table.items():
        if not isinstance(values, dict) or not all(_number(v) or v is None for v in values.values()):
            return f"field '{field}.{task}' must map metric names to numbers, got {json.dumps(values)[:40]}"
    return None


def read_results(path: Path) -> dict[str, Any]:
    """A run's ``results.json`` (the one reader), checked to have the shape its readers rely
    on (:func:`results_problem`); anything else is one line naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {os_reason(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: not JSON (nested too deeply)") from None
    problem = results_problem(results)
    if problem:
        raise DataError(f"{path}: {problem}")
    return results


def results_problem(results: Any) -> str | None:
    """What is wrong with a results.json's content, or None: a JSON object whose
    ``epochs_done`` and ``global_step`` are integers, whose ``final`` (null before the first
    evaluation) and ``last_n_mean.metrics`` are metrics tables (:func:`table_problem`)."""
    if not isinstance(results, dict):
        return f"a results table must be a JSON object, got {type(results).__name__} {json.dumps(results)[:40]}"
    for key in ("epochs_done", "global_step"):
        if key in results and (not isinstance(results[key], int) or isinstance(results[key], bool)):
            return f"field '{key}' must be an integer, got {json.dumps(results[key])[:40]}"
    if results.get("final") is not None:
        problem = table_problem(results["final"], "final")
        if problem:
            return problem
    last = results.get("last_n_mean")
    if last is not None:
        if not isinstance(last, dict) or "metrics" not in last:
            return f"field 'last_n_mean' must be an object {{n, metrics}}, got {json.dumps(last)[:40]}"
        return table_problem(last["metrics"], "last_n_mean.metrics")
    return None
