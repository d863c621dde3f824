"""Progress output: a live rich display on a terminal, plain lines otherwise.

Live display (stdout is a terminal and not ``quiet``): epoch, step / steps, per-task loss,
it/s and ETA. Plain mode (not a terminal, or ``quiet``): one line every ``log_interval``
steps, so logs piped to files stay readable. After each evaluation, a table of every
task's metrics. Only rank 0 reports (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _losses_text(losses: dict[str, float]) -> str:
    return " ".join(f"{t}={_fmt(v)}" for t, v in losses.items())


class ProgressReporter:
    def __init__(self, epochs: int, log_interval: int, quiet: bool = False, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.epochs = epochs
        self.log_interval = log_interval
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.live = enabled and not quiet and isatty
        self.console = Console(file=self.stream, force_terminal=None if self.live else False,
                               width=None if self.live else 120)
        self._progress: Progress | None = None
        self._task = None
        self._epoch_start = time.perf_counter()
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._total = 0

    # -- training ------------------------------------------------------------------
    def start_epoch(self, epoch: int, total_steps: int, done_steps: int = 0) -> None:
        if not self.enabled:
            return
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_steps = 0
        self._total = total_steps
        if self.live:
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                    BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[losses]}"),
                    TextColumn("{task.fields[rate]} it/s"), TimeRemainingColumn(),
                    console=self.console, transient=False,
                )
                self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=done_steps,
                                                 epoch=epoch + 1, epochs=self.epochs, losses="", rate="-")

    def step(self, epoch: int, step: int, losses: dict[str, float] | None, lr: float) -> None:
        """``step``: batches done in this epoch (1-based). ``losses``: the step's losses, or
        None between read-outs (the trainer reads them from the device once per
        ``log_interval`` steps and at the epoch's end, the steps a plain line is printed at)."""
        if not self.enabled:
            return
        self._window_steps += 1
        now = time.perf_counter()
        if self.live and self._progress is not None:
            rate = self._window_steps / max(now - self._epoch_start, 1e-9)
            shown = {} if losses is None else {"losses": _losses_text(losses)}
            self._progress.update(self._task, completed=step, rate=f"{rate:.2f}", **shown)
        elif step % self.log_interval == 0 or step == self._total:
            rate = self._window_steps / max(now - self._window_start, 1e-9)
            eta = (self._total - step) / rate if rate > 0 else float("nan")
            print(f"epoch {epoch + 1}/{self.epochs} step {step}/{self._total} {_losses_text(losses or {})} "
                  f"lr={lr:.3g} {rate:.2f} it/s eta {eta:.0f}s", file=self.stream, flush=True)
            self._window_start, self._window_steps = now, 0

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.live and self._progress is not None and self._task is not None:
            self._progress.update(self._task, losses="mean " + _losses_text(mean_losses))
            self._progress.stop_task(self._task)
        else:
            took = time.perf_counter() - self._epoch_start
            print(f"epoch {epoch + 1}/{self.epochs} done in {took:.1f}s, mean losses: {_losses_text(mean_losses)}",
                  file=self.stream, flush=True)

    # -- evaluation ------------------------------------------------------------------
    def metrics(self, epoch: int, metrics: dict[str, dict[str, float]], title: str | None = None) -> None:
        if not self.enabled or not metrics:
            return
        table = Table(title=title or f"evaluation after epoch {epoch + 1}")
        table.add_column("task")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for task, values in metrics.items():
            for i, (name, value) in enumerate(values.items()):
                table.add_row(task if i == 0 else "", name, _fmt(float(value)))
        self.console.print(table)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
