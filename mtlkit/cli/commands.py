"""The table of ``mtlkit`` sub-commands and the argparse parser made from it.

The built-in commands register themselves first, through the same ``register`` callback a
plugin's ``register_commands`` hook receives; then every plugin's. A name registered twice
is an error naming both plugins.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import PluginError

CORE = "mtlkit.cli"  # the plugin name the built-in commands are registered under


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    configure: Callable[[argparse.ArgumentParser], None] | None
    help: str
    group: str | None
    plugin: str

    @property
    def words(self) -> str:
        """How a user types it: ``data synth-scenes``."""
        return f"{self.group} {self.name}" if self.group else self.name


class CommandTable:
    def __init__(self) -> None:
        self.commands: dict[tuple[str | None, str], Command] = {}

    def registrar(self, plugin: str) -> Callable[..., None]:
        """The ``register`` callback for one plugin's ``register_commands``."""

        def register(name: str, run: Callable[[argparse.Namespace], int],
                     configure: Callable[[argparse.ArgumentParser], None] | None = None,
                     help: str = "", group: str | None = None) -> None:  # noqa: A002 - argparse's word
            self.add(Command(name=name, run=run, configure=configure, help=help, group=group, plugin=plugin))

        return register

    def add(self, command: Command) -> None:
        label = f"plugin '{command.plugin}': command"
        for word, what in ((command.name, "name"), (command.group, "group")):
            if word is not None and (not isinstance(word, str) or not word or word.startswith("-")
                                     or any(c.isspace() for c in word)):
                raise PluginError(f"{label} {what} {word!r} must be one word not starting with '-'")
        if not callable(command.run) or (command.configure is not None and not callable(command.configure)):
            raise PluginError(f"{label} '{command.words}': run and configure must be callables")
        clash = self.commands.get((command.group, command.name))
        if clash is None and command.group is None and any(g == command.name for g, _ in self.commands):
            clash = next(c for (g, _), c in self.commands.items() if g == command.name)
        if clash is None and command.group is not None:
            clash = self.commands.get((None, command.group))
        if clash is not None:
            raise PluginError(f"{label} 'mtlkit {command.words}' clashes with 'mtlkit {clash.words}' "
                              f"of plugin '{clash.plugin}'")
        self.commands[(command.group, command.name)] = command

    def groups(self) -> dict[str | None, list[Command]]:
        out: dict[str | None, list[Command]] = {}
        for (group, _), command in self.commands.items():
            out.setdefault(group, []).append(command)
        return out


def collect_commands(pm: Any) -> CommandTable:
    """The built-in commands, then every loaded plugin's (entry points included)."""
    from . import compare, doctor, listing, plot, predict, run, sweep

    table = CommandTable()
    core = table.registrar(CORE)
    for module in (run, listing, compare, sweep, plot, predict, doctor):
        module.register_commands(core)
    pm.load_entry_points()  # a third-party plugin's commands are there from the first call

    def once() -> CommandTable:
        attempt = CommandTable()
        attempt.commands = dict(table.commands)
        pm.call_each("register_commands", attempt.registrar)
        return attempt

    return pm.collect(once)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit code 2. Its
    sub-parsers are of the same class (argparse makes them with the parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(table: CommandTable) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mtlkit", description="Multi-task learning with swappable parts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = table.groups()
    for command in groups.pop(None, []):
        _add(sub, command)
    for group, members in groups.items():
        names = ", ".join(c.name for c in members)
        gsub = sub.add_parser(group, help=f"{group} commands: {names}").add_subparsers(
            dest=f"{group}_command", metavar="COMMAND", required=True)
        for command in members:
            _add(gsub, command)
    return parser


def _add(sub: Any, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help)
    if command.configure is not None:
        command.configure(p)
    p.set_defaults(_command=command)
