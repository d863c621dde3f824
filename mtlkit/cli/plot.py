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
    p.add_argument("--levels", default="0,4,9", help="attention levels to draw (comma separated)")


def plot_command(args: argparse.Namespace) -> int:
    from ..plots import plot_run
    from ..rundir import check_run_dir

    run = check_run_dir(Path(args.run))
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    for path in plot_run(run, n_images=args.images, attention=args.attention, levels=levels):
        print(path)
    return 0
