"""Split the gpu tests into shards that bench/gpu_check.sh runs side by side on one card.

    python bench/gpu_shards.py --shards N --first bench/gpu_first.txt --out DIR [PYTEST_ARGS...]

Writes DIR/gpu_tests_shard<i>.txt, the pytest node ids of shard i, one a line. The tests are
small on the card: what makes the phase long is inductor compiling on the host CPU and one
process's Python, so N processes on a 16-CPU machine end it about N times sooner than one.

Which test goes where (longest processing time first): a test's expected seconds are its own
``timeout`` mark halved (only the compiling tests carry one) or ``LIGHT_SECONDS``; each test,
the longest first, goes to the shard with the least expected work so far. The tests named in
the --first file go before all others, so each starts first in its shard and different
shards take them: a phase cut short by its time limit has run them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from mtlkit.atomic import atomic_write_text

LIGHT_SECONDS = 10.0  # a gpu test with no timeout mark of its own: one short training run


class _Collector:
    """A pytest plugin that keeps the collected tests' node ids and expected seconds."""

    def __init__(self) -> None:
        self.tests: list[tuple[str, float]] = []

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            mark = item.get_closest_marker("timeout")
            seconds = float(mark.args[0]) / 2 if mark and mark.args else LIGHT_SECONDS
            self.tests.append((item.nodeid, seconds))


def collect(pytest_args: list[str]) -> list[tuple[str, float]]:
    """(node id, expected seconds) of the gpu tests that ``pytest -m gpu PYTEST_ARGS`` selects."""
    collector = _Collector()
    code = pytest.main(["-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args],
                       plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise SystemExit(f"gpu_shards: pytest could not collect the gpu tests (exit {int(code)})")
    return collector.tests


def plan(tests: list[tuple[str, float]], shards: int, first: list[str]) -> list[list[str]]:
    """Node ids per shard: the ``first`` tests (in their order) before the others, then the
    rest longest first; each onto the shard with the least expected seconds so far."""
    rank = {node: i for i, node in enumerate(first)}
    order = sorted(tests, key=lambda t: (rank.get(t[0], len(rank)), -t[1]))
    out: list[list[str]] = [[] for _ in range(max(1, shards))]
    load = [0.0] * len(out)
    for node, seconds in order:
        i = min(range(len(out)), key=lambda k: (load[k], len(out[k])))
        out[i].append(node)
        load[i] += seconds
    return [s for s in out if s]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--first", type=Path, help="node ids to run first, one a line ('#' comments)")
    ap.add_argument("--out", type=Path, required=True)
    args, pytest_args = ap.parse_known_args(argv)
    first = []
    if args.first:
        first = [line.strip() for line in args.first.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    tests = collect(pytest_args)
    missing = sorted(set(first) - {node for node, _ in tests})
    if missing:  # a renamed test: say so, and run the others
        print(f"gpu_shards: {args.first}: not a collected gpu test: {', '.join(missing)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("gpu_tests_shard*.txt"):
        old.unlink()
    shards = plan(tests, args.shards, first)
    for i, nodes in enumerate(shards):
        atomic_write_text(args.out / f"gpu_tests_shard{i}.txt", "".join(f"{n}\n" for n in nodes))
    print(f"gpu_shards: {len(tests)} gpu tests in {len(shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
