"""Probes of the file system. Those data loaders make turn each OS error (a folder above
without permission, say) into a one-line DataError naming the path: ``Path.is_dir`` and
``Path.is_file`` raise it, where a caller would rather learn "no". Those writers make, before
any work, ask whether a file or folder can be created where it is asked for."""

from __future__ import annotations

import os
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


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` made absolute, or the nearest folder above it that exists (a link counts)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def creation_obstacle(path: str | os.PathLike) -> str | None:
    """Why ``path`` (not there yet) cannot be created, from cheap checks, or None: the nearest
    existing entry above it is a file, or a folder this process may not write in."""
    above = nearest_existing(path)
    if not above.is_dir():
        return f"{above} is a file"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{above} is not writable"
    return None


def topmost_missing(path: str | os.PathLike) -> Path | None:
    """The top-most folder that creating ``path`` with its parents makes (to remove again if
    the work fails); None where ``path`` exists."""
    p = Path(os.path.abspath(path))
    if os.path.lexists(p):
        return None
    while not os.path.lexists(p.parent) and p.parent != p:
        p = p.parent
    return p
