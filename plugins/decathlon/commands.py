"""``mtlkit data synth-decathlon`` and ``mtlkit decathlon submit``."""

from __future__ import annotations

from pathlib import Path

from mtlkit.hookspecs import hookimpl


MAX_IMAGE_SIZE = 1024


def _configure_synth(p) -> None:
    from mtlkit.argtypes import int_range, new_folder, non_negative_int, positive_int

    p.add_argument("out", type=new_folder, help="folder to create (new or empty)")
    p.add_argument("--n-train", type=positive_int, default=64, help="training images per domain")
    p.add_argument("--n-val", type=positive_int, default=16, help="validation images per domain")
    p.add_argument("--n-test", type=non_negative_int, default=16, help="test images per domain")
    p.add_argument("--image-size", type=int_range(16, MAX_IMAGE_SIZE), default=72, help="image side in pixels")
    p.add_argument("--seed", type=non_negative_int, default=0)


def synth_decathlon_command(args) -> int:
    from mtlkit.errors import DataError, os_reason

    from .synthetic import write_decathlon_layout

    try:
        write_decathlon_layout(args.out, args.n_train, args.n_val, args.n_test, image_size=args.image_size,
                               seed=args.seed)
    except OSError as exc:
        raise DataError(f"{args.out}: cannot write the output folder ({os_reason(exc)})") from None
    print(f"wrote ten synthetic domains (official layout) to {args.out}")
    return 0


def _configure_submit(p) -> None:
    p.add_argument("run")
    p.add_argument("--out", help="zip path (default: RUN/submission.zip)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")


def submit_command(args) -> int:
    from mtlkit.rundir import check_run_dir

    from .submission import coverage_gaps, submit_run

    run = check_run_dir(Path(args.run))
    out = Path(args.out) if args.out else run / "submission.zip"
    counts = submit_run(run, out, checkpoint=args.checkpoint)
    print(f"wrote {sum(counts.values())} predictions ({len(counts)} domains) to {out}")
    for gap in coverage_gaps(counts):  # written all the same: the notes say what the server will miss
        print(f"note: {gap}")
    return 0


@hookimpl
def register_commands(register):
    register("synth-decathlon", synth_decathlon_command, configure=_configure_synth, group="data",
             help="ten synthetic domains in the official Decathlon layout")
    register("submit", submit_command, configure=_configure_submit, group="decathlon",
             help="write the test-set predictions as the server's results.json in a zip")
