"""The ``csv`` logger: every number of the run as one long table, one row per value.

Columns ``type, epoch, global_step, tag, value``: ``type`` is the record's (step, epoch,
eval), ``tag`` one of :func:`mtlkit.engine.loggers.scalars`' names (``train/loss/TASK``,
``eval/TASK/METRIC``...). A long table keeps one header however the tasks or metrics vary
(a many-to-many step has one task's loss); pivot it on ``tag`` for one column per value.
On resume the rows past the checkpoint are dropped (the file is rewritten atomically).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from mtlkit.atomic import atomic_write_text
from mtlkit.engine.loggers import Logger, Position, kept, scalars
from mtlkit.hookspecs import hookimpl
from mtlkit.registry import Params
from mtlkit.rundir import run_folder_entry_problem

COLUMNS = ("type", "epoch", "global_step", "tag", "value")


class CsvParams(Params):
    file: str = Field("scalars.csv", description="file name in the run folder")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v.endswith(".csv") or Path(v).name != v or v.startswith(".") or "\\" in v:
            raise ValueError(f"'{v}' must be a plain file name ending in .csv (it is written in the run folder)")
        problem = run_folder_entry_problem(v, "file name")  # none of the run's own files ends in .csv today
        if problem:
            raise ValueError(problem)
        return v


def _rows_kept(path: Path, resume: Position) -> list[dict[str, str]]:
    """The rows of ``path`` that stay on a resume from ``resume`` (a torn last row is dropped)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                record = {"type": row["type"], "epoch": int(row["epoch"]), "global_step": int(row["global_step"])}
                float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            if kept(record, resume):
                rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class CsvLogger(Logger):
    def __init__(self, params: CsvParams) -> None:
        self.file = params.file
        self._fh = None
        self._writer = None

    def open(self, run_dir: Path, resume: Position | None) -> None:
        path = run_dir / self.file
        if resume is not None and path.is_file():
            atomic_write_text(path, _table(_rows_kept(path, resume)))
        elif not path.is_file() or path.stat().st_size == 0:
            atomic_write_text(path, _table([]))
        self._fh = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh, lineterminator="\n")

    def log(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            for tag, value in scalars(r):
                self._writer.writerow((r["type"], r["epoch"], r["global_step"], tag, repr(value)))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = self._writer = None


@hookimpl
def register_loggers(register):
    register("csv", CsvLogger, params=CsvParams,
             description="every logged number in one long CSV table (type, epoch, global_step, tag, value)")
