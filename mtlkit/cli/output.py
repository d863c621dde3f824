"""Where the commands print their tables."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    # A pipe or a file gets wide tables rather than 80-column folding.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
