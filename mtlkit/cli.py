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
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from .errors import CheckpointError, ConfigError, MtlkitError
from .rundir import (create_run_dir, discard_unfinished, new_run_dir, pin_for_run_folder,  # noqa: F401
                     precheck_new_run_dir, run_name)

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
    from .engine.checkpoint import atomic_write_bytes  # the one atomic writer (torch: lazy)

    atomic_write_bytes(path, text.encode("utf-8"))


def write_text_file(path: Path, text: str) -> None:
    """atomic_write_text, with a failure (read-only, full disk) as one line naming the file."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc})") from None


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    from .preflight import prepare
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
    run_dir = resume_dir
    if resume_dir is None:  # the cheap checks first: a taken or unwritable folder fails at once
        if args.run_dir:
            run_dir = Path(args.run_dir)
        else:
            run_dir = new_run_dir(args.runs_dir or recipe.output.dir, run_name(loaded))
        precheck_new_run_dir(run_dir)
    parts, baselines = prepare(loaded, init=resume_dir is None, probe=True)  # every check, before any write
    # Before the Trainer: it wraps the model in DDP, which must see the final trainable set.
    if recipe.model.freeze_shared:
        from .domains import freeze_shared

        freeze_shared(parts.model)
    if resume_dir is None:
        pin_for_run_folder(loaded)  # before the recipe's hash is taken: a resume sees the same
    from .engine import Trainer
    from .engine.distributed import shutdown

    created = None  # the folder this run made: removed again if no checkpoint follows
    try:
        if resume_dir is None:
            # Only now, with everything built and checked, does the run folder appear.
            run_dir = agree_on_run_dir(run_dir, recipe.training.device)
            if is_rank_zero():
                created = create_run_dir(run_dir)
                write_text_file(run_dir / "recipe.toml", loaded.toml())
        trainer = Trainer(
            parts.model, parts.tasks, parts.train_data, parts.val_data, weighting=parts.weighting,
            optimizer=recipe.optimizer, schedule=recipe.schedule, training=recipe.training,
            run_dir=run_dir, recipe=recipe_identity(loaded.resolved), quiet=args.quiet,
            baselines=baselines,
        )
        if resume_dir is not None and is_rank_zero():
            # every check has passed: a resume that extends training.epochs shows it in the folder
            recipe_path, text = run_dir / "recipe.toml", loaded.toml()
            if recipe_path.read_text(encoding="utf-8") != text:
                write_text_file(recipe_path, text)
        trainer.fit(resume_from=resume_dir)
    except KeyboardInterrupt:
        if is_rank_zero():
            if discard_unfinished(run_dir, created):
                print(f"interrupted before the first checkpoint: removed {run_dir}", file=sys.stderr)
            else:
                print(f"interrupted: checkpoint saved in {run_dir}", file=sys.stderr)
        return 130
    except BaseException:
        discard_unfinished(run_dir, created)
        raise
    finally:
        shutdown()
    if is_rank_zero():
        print(f"run folder: {run_dir}")
    return 0


@command("validate")
def cmd_validate(args) -> int:
    from .preflight import prepare

    loaded = _load(args)
    prepare(loaded, probe=True)  # every check `run` makes before training
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
    for register in EXTRA_PARSERS:
        register(sub)
    return parser


# Sub-commands defined in other modules add their parsers here.
EXTRA_PARSERS: list[Callable[[Any], None]] = []


def _load_extra_commands() -> None:
    from . import cli_compare, cli_extra  # noqa: F401  (they register list/plugins/params/compare/plot/data/decathlon)


def user_message(exc: BaseException) -> str:
    """The error's own message. A DataLoader worker's error reaches the main process
    re-raised as the same type with the worker's whole traceback as its message; the
    original message is that traceback's last ``module.Type: message`` part."""
    text = str(exc)
    if not (text.startswith("Caught ") and " in DataLoader worker process " in text.split("\n", 1)[0]):
        return text
    t = type(exc)
    for prefix in (f"\n{t.__module__}.{t.__qualname__}: ", f"\n{t.__qualname__}: "):
        at = text.rfind(prefix)
        if at >= 0:
            return text[at + len(prefix):].strip()
    return text.split("\n", 1)[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import plugin_manager

    plugin_manager.DEBUG = args.debug
    try:
        return COMMANDS[args.command](args)
    except MtlkitError as exc:
        if args.debug:
            raise
        for line in user_message(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        plugin_manager.DEBUG = False  # in-process callers (tests) get the default back


if __name__ == "__main__":
    raise SystemExit(main())
