"""Downloads that survive a dropped connection, and checksums (standard library only).

:func:`download` fetches a URL into ``DEST.part`` and resumes it with an HTTP ``Range``
request, both after a dropped connection (``retries`` times in one call) and in a later
call (a ``.part`` file that holds some bytes is kept and names itself in the error; a
download that got nothing keeps none). A server that ignores ``Range`` (answers 200) is
read again from the start. A complete file is checked against
the published size and sha256 where they are known; a mismatch removes it, and only then
is it renamed to ``DEST``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .atomic import promote, remove_quietly
from .errors import DataError, os_reason

CHUNK = 1 << 20
LOCAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)  # file:// URLs
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, what: str) -> None:
    """``path`` has the published ``size`` and ``sha256`` (each where known), or DataError."""
    if size is not None and path.stat().st_size != size:
        raise DataError(f"{what}: {path.stat().st_size} bytes, but the published size is {size}")
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256.lower():
            raise DataError(f"{what}: sha256 {got} does not match the published {sha256.lower()}")


class _Interrupted(Exception):
    """The connection ended before the whole body arrived."""


def _fetch_once(url: str, part: Path, timeout: float, log: Callable[[str], None]) -> None:
    """One request: append to ``part`` from its current size (or rewrite it if the server
    sends the whole file). Raises _Interrupted if the body ends early."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "mtlkit"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the user's or a plugin's URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after what we have: the file is complete
            return
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    with response:
        start, total = 0, None
        if response.status == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if m is None or int(m[1]) != have:
                raise DataError(f"{url}: the server resumed at the wrong place "
                                f"({response.headers.get('Content-Range')!r}, asked for byte {have})")
            start = have
            total = int(m[3]) if m[3] != "*" else None
        else:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if have:
                log(f"{url}: the server does not resume downloads; starting again")
        received = start
        with open(part, "ab" if start else "wb") as fh:
            try:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (http.client.HTTPException, ConnectionError, socket.timeout) as exc:
                        raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
                    if not chunk:
                        break
                    fh.write(chunk)
                    received += len(chunk)
            finally:
                fh.flush()
                os.fsync(fh.fileno())
        if total is not None and received < total:
            raise _Interrupted(f"connection closed after {received} of {total} bytes")


def download(url: str, dest: str | os.PathLike, size: int | None = None, sha256: str | None = None,
             retries: int = 3, timeout: float = 60.0, log: Callable[[str], None] | None = None) -> Path:
    """``url`` as the file ``dest``, resumed and verified (see the module); returns ``dest``.
    An existing ``dest`` (a finished earlier download) is verified and kept."""
    dest = Path(dest)
    log = log or (lambda message: None)
    if dest.is_file():
        _verified_or_removed(dest, size, sha256, f"{dest}")
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest.parent}: cannot create the download folder ({os_reason(exc)})") from None
    part = dest.with_name(dest.name + ".part")
    if part.exists() and size is not None and part.stat().st_size > size:
        remove_quietly(part)  # longer than the published file: not a prefix of it
    failures = 0
    while True:
        if part.exists() and size is not None and part.stat().st_size == size:
            break
        if part.exists():
            log(f"{dest.name}: resuming at byte {part.stat().st_size}")
        try:
            _fetch_once(url, part, timeout, log)
            break
        except (_Interrupted, urllib.error.URLError, ConnectionError, socket.timeout,
                http.client.HTTPException) as exc:
            failures += 1
            got = part.stat().st_size if part.exists() else 0
            if not got:
                remove_quietly(part)  # nothing to resume from: keep no empty .part
            reason = getattr(exc, "reason", None) or exc
            if failures > retries or isinstance(reason, LOCAL_ERRORS):  # a missing file stays missing
                if not got:
                    raise DataError(f"{url}: download failed ({reason})") from None
                raise DataError(f"{url}: download interrupted at byte {got} ({reason}); run the same command "
                                f"again to resume from {part}") from None
            log(f"{dest.name}: interrupted at byte {got} ({reason}); resuming ({failures}/{retries})" if got else
                f"{dest.name}: download failed ({reason}); trying again ({failures}/{retries})")
        except OSError as exc:  # the disk, not the network
            raise DataError(f"{part}: cannot write the download ({os_reason(exc)})") from None
    if not part.exists():
        raise DataError(f"{url}: the server sent nothing")
    _verified_or_removed(part, size, sha256, url)
    promote(part, dest)
    return dest


def _verified_or_removed(path: Path, size: int | None, sha256: str | None, what: str) -> None:
    try:
        verify(path, size, sha256, what)
    except DataError as exc:
        remove_quietly(path)
        raise DataError(f"{exc}; the download was removed") from None
