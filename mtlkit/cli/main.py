"""``mtlkit``'s entry point: collect the commands, parse, run, and turn errors into lines.

Every user error, a usage error too, is one line on stderr (several lines for several
recipe errors) and exit code 2, without a traceback unless ``--debug``. Nothing is written before the recipe, the
model and the data have been validated (see :mod:`mtlkit.runner`).
"""

from __future__ import annotations

import sys

from .. import plugin_manager
from ..errors import MtlkitError
from ..rundir import is_rank_zero
from ..runner import RunInterrupted
from .commands import OneLineParser, build_parser, collect_commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug must hold while the plugins load (a built-in that fails to import shows its
    # traceback), which happens before the full parser exists: plugins add commands to it.
    pre = OneLineParser(prog="mtlkit", add_help=False)
    pre.add_argument("--debug", action="store_true")
    try:
        debug = pre.parse_known_args(argv)[0].debug
    except SystemExit as stop:  # e.g. --debug=yes: one line, see OneLineParser
        return _exit_code(stop)
    plugin_manager.DEBUG = debug
    try:
        parser = build_parser(collect_commands(plugin_manager.get_plugin_manager()))
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # a usage error (one line, see OneLineParser) or --help
            return _exit_code(stop)
        return args._command.run(args)
    except MtlkitError as exc:
        if debug:
            raise
        for line in user_message(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except RunInterrupted as stop:
        if is_rank_zero():
            print(f"interrupted before the first checkpoint: removed {stop.run_dir}" if stop.removed else
                  # the trainer has said which checkpoint stands (a mid-step stop keeps the last one)
                  f"interrupted: continue with mtlkit run --resume {stop.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    finally:
        plugin_manager.DEBUG = False  # in-process callers (tests) get the default back


def _exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else int(stop.code is not None)


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
