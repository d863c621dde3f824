"""``mtlkit data synth-decathlon`` and ``mtlkit decathlon submit``."""

from __future__ import annotations

from pathlib import Path

from mtlkit.hookspecs import hookimpl


def _configure_synth(p) -> None:
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--image-size", type=int, default=72)
    p.add_argument("--seed", type=int, default=0)


def synth_decathlon_command(args) -> int:
    from .synthetic import write_decathlon_layout

    write_decathlon_layout(args.out, args.n_train, args.n_val, args.n_test, image_size=args.image_size,
                           seed=args.seed)
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
