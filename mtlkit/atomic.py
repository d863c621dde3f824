"""The one atomic writer: a file (or a folder) appears whole or not at all.

A file is written to a temp file beside it (``.<name>.<random>.tmp``), flushed and fsynced,
then renamed over the target, and the folder is fsynced so the rename itself is durable. A
folder is filled under a temp name beside it and renamed into place. Readers therefore see
the old content or the new, never part of it, and a killed writer leaves only temp files
that :func:`remove_temp_files` (or the next writer's clean-up) removes. No torch here: the
CLI's light commands and the plugins use it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: Path, default: int) -> int:
    """The mode a written ``path`` gets: an existing file's own, else what ``open`` would give
    (``default`` less the umask). The temp files are made owner-only (0600/0700); renamed
    as they are, every result would be unreadable to the user's group."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(fh)`` fills a binary file handle; ``path`` then appears whole, in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path, 0o666))
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)  # the rename itself must be on disk before anything relies on it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode())


def atomic_folder(out_dir: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """``fill(tmp)`` writes a whole folder under a temp name beside ``out_dir``, which then
    takes its place in one rename. ``out_dir`` must not exist or be an empty folder."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder '{out}' exists and is not empty; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, _mode_for(out, 0o777))
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder on every OS
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def promote(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a finished file or folder (a completed, verified download; an unpacked folder
    moved into a staging tree) to ``dst`` in one step, durably. For content written in
    stages across calls, which ``atomic_write`` cannot hold in one handle."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def scratch_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; its renames are durable anyway
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temp file in ``folder``: what ``os.access`` cannot tell (running as
    root, a read-only mount, /proc). Raises the OSError."""
    fd, name = tempfile.mkstemp(prefix=".mtlkit-probe.", suffix=".tmp", dir=folder)
    os.close(fd)
    remove_quietly(name)


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def remove_temp_files(folder: str | os.PathLike) -> None:
    """Remove the temp files of atomic writes that a killed process left in ``folder``."""
    for p in Path(folder).glob(".*.tmp"):
        remove_quietly(p)
