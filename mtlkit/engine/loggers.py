"""Loggers: where a run's records go. The contract (:class:`Logger`), the dispatch to the
recipe's loggers (:class:`LoggerSet`), and the scalar names the built-in loggers share
(:func:`scalars`).

``log.jsonl`` is the run's own log, always written (``compare``, ``plot`` and resume read
it; :mod:`.runfiles`): the ``jsonl`` logger is that log, so it is implicit, and naming it
in ``[[loggers]]`` changes nothing. Every other logger receives the same records, on
rank 0 only:

- ``step`` (one per training step, handed over in batches once per
  ``training.log_interval``): ``epoch``, ``step``, ``global_step``, ``domain``, ``losses``
  ``{task: value}``, ``weights`` ``{key: value}``, ``lr``, ``time``, ``elapsed``, and
  ``step_time`` (host seconds since the step before; absent on the first step after a
  resume, which has no step before it in this process);
- ``epoch`` (after each epoch): ``epoch``, ``global_step``, ``losses`` (the epoch's mean
  per task), ``weights``, ``time``;
- ``eval`` (after each evaluation): ``epoch``, ``global_step``, ``metrics``
  ``{task: {metric: value}}``, ``delta_m`` (with baselines), ``time``.

A logger whose ``wants_images`` is a positive number also gets, after each evaluation,
the attention masks of that many validation samples as images (a model without attention
masks gives none; see :func:`mtlkit.attention_masks.attention_images`).

A run that resumes from a checkpoint hands each logger the checkpoint's position at
:meth:`Logger.open`: what was logged after it is about to be logged again, and the logger
drops it (:func:`kept` says which records stay), so curves continue without a repeated
step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import MtlkitError, TrainingError


class Position(NamedTuple):
    """Where a checkpoint stands: records past it are dropped when a run resumes from it."""

    global_step: int
    epoch: int  # epochs completed


def kept(record: Mapping[str, Any], position: Position) -> bool:
    """Whether a record logged before a resume from ``position`` stays (the rule of every
    logger): steps up to the checkpoint's global step, epoch ends and evaluations of the
    epochs it completed."""
    if record.get("global_step", 0) > position.global_step:
        return False
    return not (record.get("type") in ("epoch", "eval") and record.get("epoch", 0) > position.epoch)


class Logger:
    """The logger contract. Subclass it and override what you use; :meth:`log` is required.

    All methods run in the training process, on rank 0 only, between steps.
    """

    #: how many validation samples' attention masks :meth:`log_images` wants (0: none)
    wants_images: int = 0

    def open(self, run_dir: Path, resume: Position | None) -> None:
        """Training starts (each ``fit``). ``resume``: the checkpoint the run continues from,
        or None; drop whatever this logger holds past it (see :func:`kept`)."""

    def log(self, records: list[dict[str, Any]]) -> None:
        """Records, in order (see the module's documentation)."""
        raise NotImplementedError

    def log_images(self, epoch: int, global_step: int, images: dict[str, np.ndarray]) -> None:
        """After an evaluation: ``{tag: image}``, each H x W (grey) or H x W x 3 (RGB), in [0, 1]."""

    def close(self) -> None:
        """Training stopped (finished, interrupted or failed): flush and release files."""


def scalars(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """A record's numbers as ``(tag, value)`` pairs, the names the ``csv`` and
    ``tensorboard`` loggers use (their x-axis: the record's ``global_step``):

    - step: ``train/loss/TASK``, ``train/weight/KEY``, ``train/lr``, ``train/step_time_s``;
    - epoch: ``epoch/loss/TASK`` (mean), ``epoch/weight/KEY``;
    - eval: ``eval/TASK/METRIC``, ``eval/delta_m`` (Delta_m in %).
    """
    kind = record.get("type")
    out: list[tuple[str, float]] = []
    if kind in ("step", "epoch"):
        prefix = "train" if kind == "step" else "epoch"
        out += [(f"{prefix}/loss/{t}", v) for t, v in record.get("losses", {}).items()]
        out += [(f"{prefix}/weight/{k}", v) for k, v in record.get("weights", {}).items()]
        if kind == "step":
            out.append(("train/lr", record["lr"]))
            if "step_time" in record:
                out.append(("train/step_time_s", record["step_time"]))
    elif kind == "eval":
        out += [(f"eval/{t}/{m}", v) for t, values in record.get("metrics", {}).items() for m, v in values.items()]
        if "delta_m" in record:
            out.append(("eval/delta_m", record["delta_m"]))
    return [(tag, float(v)) for tag, v in out if v is not None]  # a NaN metric is logged as NaN, as in log.jsonl


def named_loggers(loggers: Mapping[str, Logger] | Sequence[Logger] | None) -> dict[str, Logger]:
    """``loggers`` by name (a list is named after each logger's class)."""
    if loggers is None:
        return {}
    if isinstance(loggers, Mapping):
        return dict(loggers)
    return {f"{type(lg).__name__}#{i}": lg for i, lg in enumerate(loggers)}


class LoggerSet:
    """The recipe's loggers, fed together; a logger's failure stops training with one line
    naming it (the last checkpoint stays)."""

    def __init__(self, loggers: Mapping[str, Logger]) -> None:
        self.loggers = dict(loggers)
        self._last_elapsed: float | None = None

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, method: str, *args: Any) -> None:
        for name, lg in self.loggers.items():
            try:
                getattr(lg, method)(*args)
            except MtlkitError:
                raise
            except Exception as exc:  # noqa: BLE001 - one line naming the logger
                text = " ".join(str(exc).split())
                raise TrainingError(f"logger '{name}': {method} failed: {type(exc).__name__}"
                                    f"{': ' + text if text else ''}") from exc

    def open(self, run_dir: Path, resume: Position | None) -> None:
        self._last_elapsed = None
        self._each("open", run_dir, resume)

    def log(self, records: list[dict[str, Any]]) -> None:
        if not self.loggers or not records:
            return
        out = []
        for r in records:
            if r.get("type") == "step":
                previous = 0.0 if r.get("global_step") == 1 else self._last_elapsed
                r = dict(r) if previous is None else {**r, "step_time": r["elapsed"] - previous}
                self._last_elapsed = r["elapsed"]
            out.append(r)
        self._each("log", out)

    def log_images(self, model, data, epoch: int, global_step: int) -> None:
        """After an evaluation: the attention masks of the first validation samples, to the
        loggers that want them. Every global RNG is left as it was: a run trains the same
        with or without image logging."""
        wanted = {n: lg for n, lg in self.loggers.items() if getattr(lg, "wants_images", 0)}
        if not wanted or data is None:
            return
        from ..attention_masks import attention_images
        from .state import capture_rng, rng_to_json, set_rng_state

        rng = capture_rng()
        try:
            images = attention_images(model, data, max(int(lg.wants_images) for lg in wanted.values()))
        finally:
            set_rng_state(rng_to_json(rng))
        if images:
            LoggerSet(wanted)._each("log_images", epoch, global_step, images)

    def close(self) -> None:
        """Close every logger, even after one fails (the first failure is then raised)."""
        failure = None
        for name, lg in self.loggers.items():
            try:
                LoggerSet({name: lg})._each("close")
            except MtlkitError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
