"""``mtlkit predict`` and ``mtlkit data fetch``: a run's predictions, a data set's files."""

from __future__ import annotations

import argparse

from ..argtypes import int_range


def register_commands(register) -> None:
    register("predict", predict_command, configure=_configure_predict,
             help="run a trained run's tasks on image files or .npy arrays (raw outputs, PNG panels, top-5)")
    register("fetch", fetch_command, configure=_configure_fetch, group="data",
             help="download (or unpack) a data set's published release into the layout its loader reads")


def _configure_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files (PNG, JPEG, ...) or .npy arrays")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs (created if missing)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best (else last, the default) or last")
    p.add_argument("--tile", action="store_true",
                   help="cut dense inputs into tiles of the training size instead of resizing them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist in --out (default: refuse, writing nothing)")
    p.add_argument("--split", metavar="SPLIT",
                   help="instead of INPUTs: the data set's official results file for this whole split")


def predict_command(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..predict import predict_files, predict_split

    if args.split is not None:
        if args.inputs:
            raise ConfigError("predict: give INPUT files or --split, not both")
        if args.overwrite:
            raise ConfigError("predict: --overwrite is for INPUT files; --split replaces its results file anyway")
        written = predict_split(args.run, args.split, args.out, which=args.checkpoint)
    else:
        written = predict_files(args.run, args.inputs, args.out, which=args.checkpoint, tile=args.tile,
                                overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def _configure_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="a data set with declared sources (see docs/data.md)")
    p.add_argument("root", metavar="ROOT", help="folder to create, in the layout the data set's loader reads")
    p.add_argument("--url", action="append", default=[], metavar="[ARCHIVE=]URL",
                   help="download from this URL instead (ARCHIVE=URL where the data set has several archives)")
    p.add_argument("--from-archive", action="append", default=[], metavar="[ARCHIVE=]FILE",
                   help="use this already downloaded archive (no network)")
    p.add_argument("--download-dir", metavar="DIR",
                   help="where downloads (and partial downloads, resumed later) go (default: ROOT.download)")
    p.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives after unpacking")
    p.add_argument("--retries", type=int_range(0, 100), default=3, help="resume an interrupted download this many times")


def fetch_command(args: argparse.Namespace) -> int:
    from ..fetch import fetch

    root = fetch(args.dataset, args.root, urls=args.url, archives=args.from_archive,
                 download_dir=args.download_dir, keep_archives=args.keep_archives, retries=args.retries,
                 progress=print)
    print(f"{args.dataset}: ready in {root}")
    return 0
