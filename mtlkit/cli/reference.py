"""docs/cli.md, generated from the commands' own argparse parsers (the built-in commands
and those the built-in plugins add). ``python -m mtlkit.cli.reference`` rewrites it, and
with it every page :mod:`mtlkit.docgen` generates; a test fails when it is stale.

It lives in the CLI package because it reads the CLI (the core never imports it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import docgen
from .commands import CommandTable, collect_commands


def _builtin_commands(table: CommandTable) -> list:
    return [c for c in table.commands.values() if c.plugin == "mtlkit.cli" or c.plugin.startswith("mtlkit.plugins.")]


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _synopsis(action: argparse.Action) -> str:
    name = _metavar(action)
    if not action.option_strings:  # a positional
        return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(action.nargs, name)
    flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
    takes = action.nargs != 0
    arg = f"{flag} {name}" if takes else flag
    return arg if action.required else f"[{arg}]"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def command_section(words: str, help_text: str, parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    lines = [f"## `mtlkit {words}`", "", _cell(help_text) or "", "", "```text",
             " ".join([f"mtlkit {words}", *(_synopsis(a) for a in actions)]), "```", ""]
    if actions:
        lines += ["| argument | default | description |", "|---|---|---|"]
        for a in actions:
            name = ", ".join(a.option_strings) if a.option_strings else _metavar(a)
            repeat = " (repeatable)" if isinstance(a, argparse._AppendAction) else ""
            hidden = a.default is None or a.default is False or a.default == [] or a.default is argparse.SUPPRESS
            default = "" if hidden or not a.option_strings else f"`{a.default}`"
            lines.append(f"| `{name}` | {default} | {_cell(a.help or '')}{repeat} |")
        lines.append("")
    return lines


def cli_reference() -> str:
    from ..plugin_manager import get_plugin_manager

    table = collect_commands(get_plugin_manager())
    lines = ["# Command reference", "",
             "Generated from the commands' parsers by `python -m mtlkit.cli.reference`; do not edit by hand.",
             "Every command also takes `-h`; `mtlkit --debug COMMAND ...` shows tracebacks. A user error",
             "is one line on stderr and exit code 2.", ""]
    for command in _builtin_commands(table):
        parser = argparse.ArgumentParser(prog=f"mtlkit {command.words}", add_help=False)
        if command.configure is not None:
            command.configure(parser)
        lines += command_section(command.words, command.help, parser)
    return "\n".join(lines).rstrip() + "\n"


GENERATED = {**docgen.GENERATED, "cli.md": cli_reference}


if __name__ == "__main__":
    import sys

    os.environ.setdefault("MTLKIT_LOAD_ENTRY_POINTS", "0")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent.parent / "docs"
    for p in docgen.write(target, GENERATED):
        print(p)
