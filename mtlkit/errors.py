"""Errors that the CLI turns into one line and exit code 2 (no traceback unless --debug)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MtlkitError(Exception):
    """A user-facing error: its message is one line naming the file, field or plugin."""

    exit_code = 2


class ConfigError(MtlkitError):
    """A recipe or parameter is invalid."""


class PluginError(MtlkitError):
    """A plugin failed to load, or two plugins claim the same name."""


class UnknownComponentError(MtlkitError, KeyError):
    """A component name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(MtlkitError):
    """A data set is missing, has the wrong layout, or holds bad values."""


class CheckpointError(MtlkitError):
    """A checkpoint or run folder is missing, truncated or of the wrong format."""


class TrainingError(MtlkitError):
    """Training cannot go on (for example a NaN or Inf loss)."""


def os_reason(exc: OSError) -> str:
    """An OS error's reason for a one-line message ("Permission denied"): its strerror,
    else its text, else its type (errors raised without an errno have no strerror)."""
    return exc.strerror or str(exc) or type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ", did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f", did you mean '{close[0]}'?" if close else ""


def prefixed(prefix: str, exc: MtlkitError) -> MtlkitError:
    """``exc`` of the same type, its message after ``prefix`` (where it happened)."""
    try:
        return type(exc)(f"{prefix}{exc}")
    except TypeError:  # a subclass with another constructor
        return ConfigError(f"{prefix}{exc}")
