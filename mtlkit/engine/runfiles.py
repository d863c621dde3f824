"""The run folder's plain files: ``log.jsonl`` and ``results.json`` (rank 0 writes them).

``log.jsonl`` holds one JSON record a line: ``step`` records (epoch, step, global_step,
domain, losses, weights, lr, time, elapsed), an ``epoch`` record after each epoch (mean
losses, weights) and an ``eval`` record after each evaluation (metrics, delta_m). Step
records are written in batches, once per log interval (:mod:`.readout`); ``time`` is when
the host finished queueing the step. On resume, records past the checkpoint are dropped
(they are about to be redone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_bytes, atomic_write_json


class RunFiles:
    """``run_dir``'s log and results; does nothing when ``writes`` is false (no run folder,
    or not rank 0)."""

    def __init__(self, run_dir: Path | None, writes: bool) -> None:
        self.run_dir, self.writes = run_dir, writes
        self._log = None

    def open(self) -> None:
        if self.writes and self._log is None:
            self._log = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self, records: list[dict[str, Any]]) -> None:
        """Append records and flush (a batch of steps, or one epoch or eval record)."""
        if self._log is not None and records:
            self._log.write("".join(json.dumps(r) + "\n" for r in records))
            self._log.flush()

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
        """Drop log records past the checkpoint (written before a crash, about to be redone)."""
        if not self.writes:
            return
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if rec.get("global_step", 0) > global_step:
                continue
            if rec.get("type") in ("epoch", "eval") and rec.get("epoch", 0) > epoch:
                continue
            keep.append(line)
        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
