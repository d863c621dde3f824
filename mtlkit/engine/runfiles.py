"""The run folder's plain files: ``log.jsonl`` and ``results.json`` (rank 0 writes them),
and the hand-over of every record to the recipe's other loggers (:mod:`.loggers`).

``log.jsonl`` holds one JSON record a line: ``step`` records (epoch, step, global_step,
domain, losses, weights, lr, time, elapsed), an ``epoch`` record after each epoch (mean
losses, weights) and an ``eval`` record after each evaluation (metrics, delta_m). Step
records are written in batches, once per log interval (:mod:`.readout`); ``time`` is when
the host finished queueing the step. On resume, records past the checkpoint are dropped
(they are about to be redone), in every logger, when training starts again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..rundir import check_run_files, read_log
from .checkpoint import atomic_write_bytes, atomic_write_json
from .loggers import Logger, LoggerSet, Position, kept, named_loggers


class JsonlLog(Logger):
    """``log.jsonl``: one JSON record a line, appended and flushed per batch of records.
    Every run writes it (the ``jsonl`` logger names it in recipes)."""

    def __init__(self, earlier: list[dict[str, Any]] | None = None) -> None:
        self._fh = None
        self._earlier = earlier  # the log's records as already read and checked (a resume)

    def open(self, run_dir: Path, resume: Position | None) -> None:
        path = run_dir / "log.jsonl"
        if resume is not None and path.is_file():
            # the one log reader: a torn last line is dropped, any other bad line refused
            # (one line naming it) before the log is rewritten
            earlier, self._earlier = self._earlier, None
            keep = [json.dumps(r) for r in (earlier if earlier is not None else read_log(run_dir)) if kept(r, resume)]
            atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
        if self._fh is None:
            self._fh = open(path, "a", encoding="utf-8")

    def log(self, records: list[dict[str, Any]]) -> None:
        if self._fh is not None and records:
            self._fh.write("".join(json.dumps(r) + "\n" for r in records))
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RunFiles:
    """``run_dir``'s log and results, and the recipe's other loggers; does nothing when
    ``writes`` is false (no run folder, or not rank 0)."""

    def __init__(self, run_dir: Path | None, writes: bool, loggers=None) -> None:
        self.run_dir, self.writes = run_dir, writes
        # a log this run will continue (a resume) is read and checked now, before anything in
        # the run folder is written (a damaged line is one error naming it, the folder as it
        # was); the records are kept for the rewrite at open, so the log is read once. A log
        # or results.json that is there but no regular file (a folder) is refused now too.
        if writes and run_dir is not None:
            check_run_files(run_dir)
        earlier = read_log(run_dir) if writes and run_dir is not None and (run_dir / "log.jsonl").is_file() else None
        self.run_log = JsonlLog(earlier)
        # a jsonl logger from the recipe is this same log: one file, written once
        self.loggers = LoggerSet({n: lg for n, lg in named_loggers(loggers).items() if not isinstance(lg, JsonlLog)})
        self._resume: Position | None = None

    def open(self) -> None:
        if self.writes:
            resume, self._resume = self._resume, None
            self.run_log.open(self.run_dir, resume)
            self.loggers.open(self.run_dir, resume)

    def close(self) -> None:
        try:
            self.run_log.close()
        finally:
            if self.writes:
                self.loggers.close()

    def log(self, records: list[dict[str, Any]]) -> None:
        """Append records (a batch of steps, or one epoch or eval record) to every log."""
        if self.writes and records:
            self.run_log.log(records)
            self.loggers.log(records)

    def log_images(self, model, data, epoch: int, global_step: int) -> None:
        """After an evaluation: attention masks to the loggers that want them."""
        if self.writes:
            self.loggers.log_images(model, data, epoch, global_step)

    def write_results(self, epochs_done: int, global_step: int, history: list[dict[str, Any]],
                      best: dict[str, Any] | None, last_n: int | None) -> None:
        if not self.writes:
            return
        out: dict[str, Any] = {"epochs_done": epochs_done, "global_step": global_step,
                               "final": history[-1]["metrics"] if history else None,
                               "best": best, "history": history}
        if last_n and history:
            last = history[-last_n:]
            mean: dict[str, dict[str, float]] = {}
            for t, values in last[-1]["metrics"].items():
                mean[t] = {k: float(np.mean([h["metrics"][t][k] for h in last])) for k in values}
            out["last_n_mean"] = {"n": len(last), "metrics": mean}
        atomic_write_json(self.run_dir / "results.json", out)

    def truncate_log(self, global_step: int, epoch: int) -> None:
        """The run resumes from this checkpoint: the next :meth:`open` drops what every log
        holds past it (written before a crash or interrupt, about to be redone)."""
        self._resume = Position(global_step, epoch)
