"""``mtlkit plot``: training curves, prediction panels and attention masks of a run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_commands(register) -> None:
    register("plot", plot_command, configure=_configure,
             help="training curves and prediction panels (PNG) in the run folder")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder")
    p.add_argument("--images", type=int, default=3, help="validation images to draw")
    p.add_argument("--attention", action="store_true", help="also draw each task's attention masks")
    p.add_argument("--levels", default=DEFAULT_LEVELS, help="attention levels to draw (comma separated)")


DEFAULT_LEVELS = "0,4,9"


def parse_levels(text: str) -> list[int]:
    """``--levels``: comma-separated attention level numbers (0 or more), one line if not."""
    from ..errors import ConfigError

    words = [w.strip() for w in text.split(",")]
    if not any(words):
        raise ConfigError(f"plot --levels: '{text}' names no level (give comma-separated numbers, e.g. 0,4,9)")
    levels = []
    for w in words:
        if not w:
            continue
        try:
            lv = int(w)
        except ValueError:
            lv = -1
        if lv < 0:
            raise ConfigError(f"plot --levels: '{w}' is not a level number (give comma-separated "
                              f"whole numbers from 0, e.g. 0,4,9)")
        levels.append(lv)
    return levels


def plot_command(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..plots import plot_run
    from ..rundir import check_run_dir

    if args.images < 1:  # every argument checked before the run folder is read
        raise ConfigError(f"plot --images: {args.images}, expected at least 1")
    levels = parse_levels(args.levels)
    run = check_run_dir(Path(args.run))
    # levels named on the command line must exist; the default fits models with fewer levels
    strict = args.levels != DEFAULT_LEVELS
    for path in plot_run(run, n_images=args.images, attention=args.attention, levels=levels, strict_levels=strict):
        print(path)
    return 0
