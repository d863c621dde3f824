"""Probes of the file system that data loaders make, each OS error (a folder above without
permission, say) turned into a one-line DataError naming the path: ``Path.is_dir`` and
``Path.is_file`` raise it, where a caller would rather learn "no"."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, os_reason


def unreadable(path: Path, exc: OSError, what: str = "") -> DataError:
    """The one-line error for an ``OSError`` met while probing or listing ``path``;
    ``what`` leads the message (the file or field that named the path)."""
    return DataError(f"{what}{path}: cannot be read ({os_reason(exc)})")


def is_dir(path: Path, what: str = "") -> bool:
    try:
        return path.is_dir()
    except OSError as exc:
        raise unreadable(path, exc, what) from None


def is_file(path: Path, what: str = "") -> bool:
    try:
        return path.is_file()
    except OSError as exc:
        raise unreadable(path, exc, what) from None
