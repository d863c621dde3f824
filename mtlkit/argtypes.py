"""Argument types (``type=`` of argparse's ``add_argument``) shared by the core's commands and
the plugins' (``register_commands``): a bad number or output folder is refused in one line,
naming the argument, before the command runs. In the core, not in :mod:`mtlkit.cli`, because
plugins may not import the CLI."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from .errors import os_reason


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``low`` to ``high`` (None: no upper bound)."""
    span = f"from {low} to {high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = f"int {span}"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)


def float_range(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number from ``low`` to ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a number from {low:g} to {high:g}, got '{text}'")
        return value

    return parse


def new_folder(text: str) -> str:
    """An argparse ``type``: a folder a command creates, which must not exist yet or be empty
    (not a file, not under a file)."""
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"'{text}': cannot read the folder ({os_reason(exc)})") from None
        if not empty:
            raise argparse.ArgumentTypeError(f"'{text}' is a folder that is not empty; give a new or empty folder")
    elif path.exists() or path.is_symlink():
        raise argparse.ArgumentTypeError(f"'{text}' is a file, not a folder; give a new or empty folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}': '{parent}' is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"'{text}': cannot write in '{parent}' (permission denied)")
    return text
