"""The ``mtlkit`` command line.

Every user error is one line on stderr (several lines for several recipe errors) and exit
code 2, without a traceback unless ``--debug``. Nothing is written before the recipe,
the model and the data have been validated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from .errors import CheckpointError, ConfigError, MtlkitError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def console() -> Console:
    # A pipe or a file gets wide tables rather than 80-column folding.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


# -- helpers -------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    from .engine.checkpoint import atomic_write_bytes  # the one atomic writer

    atomic_write_bytes(path, text.encode("utf-8"))


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def new_run_dir(base: str, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(base) / name / stamp
    i = 1
    while run.exists():
        run = Path(base) / name / f"{stamp}-{i}"
        i += 1
    return run


def check_run_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run folder (no such directory)")
    if not (path / "recipe.toml").is_file():
        raise CheckpointError(f"{path}: not a run folder (no recipe.toml)")
    return path


def check_writable(run: Path) -> None:
    """A resumed run replaces files in the run and checkpoints folders and appends to the log."""
    for p in (run, run / "checkpoints", run / "log.jsonl"):
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise CheckpointError(f"{p}: not writable (resuming writes checkpoints and logs there)")


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


def resolve_baselines(baselines: dict, recipe_path: Path | None) -> dict[str, dict[str, float]]:
    """Recipe baselines: metric tables as given, or read from earlier runs' results.json."""
    out = {}
    for task, spec in baselines.items():
        if isinstance(spec, dict):
            out[task] = spec
            continue
        path = Path(spec)
        if not path.is_absolute() and recipe_path is not None and not path.exists():
            path = recipe_path.parent / path
        results = path / "results.json" if path.is_dir() else path
        if not results.is_file():
            raise ConfigError(f"[baselines] {task}: '{spec}' is not a run folder with a results.json")
        try:
            data = json.loads(results.read_text())
            table = (data.get("last_n_mean") or {}).get("metrics") or data.get("final") or {}
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"[baselines] {task}: {results} is not a results.json") from None
        if task not in table:
            raise ConfigError(f"[baselines] {task}: {results} has no results for task '{task}'")
        out[task] = table[task]
    return out


def recipe_identity(resolved: dict) -> dict:
    """What a checkpoint's recipe hash covers: everything but ``training.epochs``, so that
    a resumed run may be extended, while any other change is refused."""
    import copy

    ident = copy.deepcopy(resolved)
    ident.get("training", {}).pop("epochs", None)
    return ident


def init_from(model, spec) -> None:
    """Load the weights a recipe's ``model.init_from`` names (include/exclude globs)."""
    import fnmatch

    from .engine import load_model_weights

    def keep(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in spec.include) and not any(
            fnmatch.fnmatchcase(key, p) for p in spec.exclude)

    load_model_weights(model, newest_run(Path(spec.path)), key_filter=keep, which="best")  # best, else last


def newest_run(path: Path) -> Path:
    """A file or run folder as it is; a folder of run folders (runs/<name>) -> its newest run."""
    if path.is_dir() and not (path / "checkpoints").is_dir():
        runs = sorted(p for p in path.iterdir() if (p / "checkpoints").is_dir())
        if not runs:
            raise ConfigError(f"[model.init_from] path: '{path}' holds no run folder with checkpoints")
        return runs[-1]  # run folders are named by their start time
    return path


# -- run / validate / show ---------------------------------------------------------------
def _load(args) -> Any:
    from .recipe.loader import load_recipe

    return load_recipe(args.recipe, overrides=args.set or [], synthetic=getattr(args, "synthetic", False))


def _data_hint(loaded, exc: MtlkitError) -> MtlkitError:
    """Append the one flag that switches to synthetic data when the recipe offers it."""
    from .errors import DataError

    r = loaded.recipe
    has_stand_in = (r.data is not None and r.data.synthetic is not None) or any(
        t.data is not None and t.data.synthetic is not None for t in r.tasks.values()
    )
    if isinstance(exc, DataError) and has_stand_in:
        return DataError(f"{exc} (no data? run with --synthetic to use the built-in synthetic stand-in)")
    return exc


@command("run")
def cmd_run(args) -> int:
    from .build import build_parts
    from .recipe.loader import load_recipe

    resume_dir = None
    if args.resume:
        from .engine.checkpoint import check_recipe, checkpoint_meta, recipe_sha256

        # Every check before the first write: a refused resume leaves the run folder as it was.
        resume_dir = check_run_dir(Path(args.resume))
        meta, meta_path = checkpoint_meta(resume_dir)  # missing, truncated or foreign: refused
        loaded = load_recipe(resume_dir / "recipe.toml", overrides=args.set or [])
        check_recipe(meta, recipe_sha256(recipe_identity(loaded.resolved)), str(meta_path))
        check_writable(resume_dir)
    else:
        if not args.recipe:
            raise ConfigError("run: give a RECIPE (or --resume RUN_DIR)")
        loaded = _load(args)
    recipe = loaded.recipe
    try:
        parts = build_parts(recipe)
    except MtlkitError as exc:
        raise _data_hint(loaded, exc) from None
    baselines = resolve_baselines(recipe.baselines, loaded.path)
    from .engine import Trainer

    # Before the Trainer: it wraps the model in DDP, which must see the final trainable set;
    # before the run folder: a failing init_from leaves none behind.
    if recipe.model.init_from is not None and resume_dir is None:
        init_from(parts.model, recipe.model.init_from)
    if recipe.model.freeze_shared:
        from .domains import freeze_shared

        freeze_shared(parts.model)
    created = False
    if resume_dir is not None:
        run_dir = resume_dir
    else:
        base = args.runs_dir or recipe.output.dir
        run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(base, recipe.output.name or loaded.name)
        run_dir = agree_on_run_dir(run_dir, recipe.training.device)
        if is_rank_zero():
            run_dir.mkdir(parents=True, exist_ok=False)
            created = True
    try:
        trainer = Trainer(
            parts.model, parts.tasks, parts.train_data, parts.val_data, weighting=parts.weighting,
            optimizer=recipe.optimizer, schedule=recipe.schedule, training=recipe.training,
            run_dir=run_dir, recipe=recipe_identity(loaded.resolved), quiet=args.quiet,
            baselines=baselines,
        )
    except BaseException:
        if created:
            run_dir.rmdir()  # still empty: the Trainer writes nothing
        raise
    recipe_path, text = run_dir / "recipe.toml", loaded.toml()
    # a resume may extend training.epochs: the run folder shows what it now runs
    if is_rank_zero() and (not recipe_path.is_file() or recipe_path.read_text(encoding="utf-8") != text):
        atomic_write_text(recipe_path, text)
    from .engine.distributed import shutdown

    try:
        trainer.fit(resume_from=resume_dir)
    except KeyboardInterrupt:
        if is_rank_zero():
            print(f"interrupted: checkpoint saved in {run_dir}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    if is_rank_zero():
        print(f"run folder: {run_dir}")
    return 0


@command("validate")
def cmd_validate(args) -> int:
    loaded = _load(args)
    print(f"{args.recipe}: ok ({len(loaded.recipe.tasks)} tasks, "
          f"{'many-to-many' if loaded.recipe.many_to_many else 'one-to-many'})")
    return 0


@command("show")
def cmd_show(args) -> int:
    from .build import build_model, parameter_counts

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


# -- argument parsing -----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning with swappable parts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p, required=True):
        p.add_argument("recipe", nargs=None if required else "?", help="recipe file or built-in name")
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a field (TOML value)")
        p.add_argument("--synthetic", action="store_true", help="use the recipe's synthetic stand-in data")

    p = sub.add_parser("run", help="train a recipe")
    recipe_args(p, required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="plain progress lines")
    p.add_argument("--runs-dir", help="base folder for run folders (default: the recipe's output.dir)")
    p.add_argument("--run-dir", help="exact run folder to create")
    recipe_args(sub.add_parser("validate", help="check a recipe"))
    recipe_args(sub.add_parser("show", help="print the resolved recipe and parameter counts"))
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("kind", nargs="?")
    p.add_argument("glob", nargs="?")
    sub.add_parser("plugins", help="list loaded plugins")
    for register in EXTRA_PARSERS:
        register(sub)
    return parser


# Sub-commands defined in other modules add their parsers here.
EXTRA_PARSERS: list[Callable[[Any], None]] = []


def _load_extra_commands() -> None:
    from . import cli_extra  # noqa: F401  (registers params/compare/plot/data/decathlon)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MtlkitError as exc:
        if args.debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
