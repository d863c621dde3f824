"""``mtlkit data fetch NAME ROOT``: a data set's published release, in the layout its loader reads.

A data set plugin declares its sources through the ``register_data_sources`` hook: one or
more :class:`Archive` (URL, size and sha256 where published, format, and where each of its
folders goes under ROOT), and a recipe that reads the data. :func:`fetch` then

1. downloads every archive (:func:`mtlkit.download.download`: resumed after a dropped
   connection, checked against the published size and sha256), or takes the user's own
   copy (``archives``, no network; checked the same way);
2. unpacks them, archives inside archives too (``Archive.inner``), into a temporary folder
   beside ROOT, and moves each declared folder (found by a marker path it holds, at any
   depth) to its place; an archive without it is an error naming the archive and the
   marker;
3. makes the data checks ``mtlkit validate`` makes (:func:`mtlkit.preflight.prepare`) on the
   declared recipe pointed at that folder, and reads each split's first sample;
4. renames the folder to ROOT (:func:`mtlkit.atomic.atomic_folder`).

Any failure leaves no ROOT and no half-unpacked folder; a bad download is removed, an
interrupted one stays as ``.part`` for the next call to resume. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from .atomic import atomic_folder, promote, scratch_folder
from .download import download, verify
from .errors import ConfigError, DataError, MtlkitError, PluginError, did_you_mean, os_reason

FORMATS = ("zip", "tar", "tar.gz")
MAX_MARKER_DEPTH = 4  # how deep in an unpacked archive a declared folder is looked for


@dataclass(frozen=True)
class Archive:
    """One published file of a data set.

    ``places``: ``(marker, destination)`` pairs: the folder of the unpacked archive that holds
    the path ``marker`` becomes ``ROOT/destination`` ("." for ROOT itself). ``inner``: a glob
    of archives inside this one that are unpacked where they lie first. ``size`` (bytes) and
    ``sha256``: where published (None otherwise); ``note``: free text for the docs (an
    approximate size, the licence)."""

    name: str
    url: str
    format: str
    places: tuple[tuple[str, str], ...]
    size: int | None = None
    sha256: str | None = None
    inner: str | None = None
    filename: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise PluginError(f"archive '{self.name}': format '{self.format}' is not one of {', '.join(FORMATS)}")
        if not self.places:
            raise PluginError(f"archive '{self.name}': no places (which folder goes where under ROOT)")

    @property
    def file_name(self) -> str:
        return self.filename or PurePosixPath(urlparse(self.url).path).name or f"{self.name}.{self.format}"


@dataclass(frozen=True)
class DataSource:
    dataset: str
    archives: tuple[Archive, ...]
    recipe: str | None  # a recipe reading the data set (the check after unpacking)
    description: str = ""
    plugin: str = "?"


def data_sources(pm: Any = None) -> dict[str, DataSource]:
    """{data set: its declared source} from every plugin's ``register_data_sources``."""
    from .plugin_manager import get_plugin_manager

    pm = pm or get_plugin_manager()
    pm.load_entry_points()

    def once() -> dict[str, DataSource]:
        table: dict[str, DataSource] = {}

        def registrar(plugin: str) -> Callable[..., None]:
            def register(dataset: str, archives: Sequence[Archive], recipe: str | None = None,
                         description: str = "") -> None:
                if not isinstance(dataset, str) or not dataset:
                    raise PluginError(f"plugin '{plugin}': a data source needs a data set name")
                if not archives or not all(isinstance(a, Archive) for a in archives):
                    raise PluginError(f"plugin '{plugin}': data source '{dataset}' needs a list of mtlkit.fetch.Archive")
                if dataset in table:
                    raise PluginError(f"plugin '{plugin}': data source '{dataset}' is already declared by plugin "
                                      f"'{table[dataset].plugin}'")
                table[dataset] = DataSource(dataset, tuple(archives), recipe, description, plugin)

            return register

        pm.call_each("register_data_sources", registrar)
        return table

    return pm.collect(once)


def _per_archive(values: Sequence[str], source: DataSource, option: str) -> dict[str, str]:
    """``--url``/``--from-archive`` values by archive: ``NAME=VALUE``, or a bare VALUE when
    the data set has one archive."""
    names = [a.name for a in source.archives]
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if sep and key in names:
            name, value = key, rest
        elif len(names) == 1:
            name = names[0]
        else:
            raise ConfigError(f"{option} '{value}': say which archive (ARCHIVE=...; archives of "
                              f"'{source.dataset}': {', '.join(names)})")
        if name in out:
            raise ConfigError(f"{option}: archive '{name}' given twice")
        out[name] = value
    return out


URL_SCHEMES = ("http", "https", "ftp", "file")


def _check_url(url: str) -> None:
    """``--url`` is a URL urllib can fetch, or a one-line ConfigError naming it."""
    try:
        parts = urlparse(url)
    except ValueError as exc:
        raise ConfigError(f"--url '{url}': not a valid URL ({exc})") from None
    if parts.scheme not in URL_SCHEMES or not (parts.netloc or parts.scheme == "file" and parts.path):
        raise ConfigError(f"--url '{url}': not a URL to download (it starts with "
                          f"{', '.join(s + '://' for s in URL_SCHEMES)})")


# -- unpacking ----------------------------------------------------------------------------------
def _format_of(path: Path) -> str:
    name = path.name.lower()
    return "zip" if name.endswith(".zip") else "tar.gz" if name.endswith((".tar.gz", ".tgz")) else "tar"


def extract(path: Path, fmt: str, into: Path) -> None:
    """Unpack ``path`` into ``into``; a member that would land outside it is refused."""
    def outside(member: str) -> bool:
        parts = PurePosixPath(member.replace("\\", "/")).parts
        return member.startswith(("/", "\\")) or ".." in parts or bool(parts and ":" in parts[0])

    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                bad = next((m for m in zf.namelist() if outside(m)), None)
                if bad is not None:
                    raise DataError(f"{path}: member '{bad}' would unpack outside the folder")
                zf.extractall(into)
        else:
            with tarfile.open(path, "r:*") as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: links and devices checked too
                    tf.extractall(into, filter="data")
                else:
                    bad = next((m.name for m in tf.getmembers() if outside(m.name) or not (m.isfile() or m.isdir())),
                               None)
                    if bad is not None:
                        raise DataError(f"{path}: member '{bad}' is a link, a device or outside the folder")
                    tf.extractall(into)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot unpack as {fmt} ({type(exc).__name__}: {exc})") from None


def locate(top: Path, marker: str) -> Path | None:
    """The shallowest folder under ``top`` (``top`` included) holding the path ``marker``."""
    level = [top]
    for _ in range(MAX_MARKER_DEPTH + 1):
        hits = sorted(d for d in level if (d / marker).exists())
        if hits:
            return hits[0]
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and not c.is_symlink())
    return None


def _merge(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        promote(src, dst)
        return
    if not dst.is_dir() or not src.is_dir():
        raise DataError(f"two archives both provide '{dst.name}'")
    for child in sorted(src.iterdir()):
        _merge(child, dst / child.name)


def unpack(archive: Archive, path: Path, staging: Path, dataset: str) -> None:
    """Unpack ``path`` and move its declared folders into ``staging``."""
    scratch = scratch_folder(staging, ".unpack-")
    try:
        extract(path, archive.format, scratch)
        if archive.inner:
            for inner in sorted(scratch.rglob(archive.inner)):
                if inner.is_file():
                    extract(inner, _format_of(inner), inner.parent)
                    inner.unlink()
        for marker, dest in archive.places:
            found = locate(scratch, marker)
            if found is None:
                top = sorted(p.name + ("/" if p.is_dir() else "") for p in scratch.iterdir())[:6]
                raise DataError(f"{path.name}: archive '{archive.name}' does not unpack to the {dataset} layout: no "
                                f"folder holds '{marker}' (its top level: {', '.join(top) or 'empty'})")
            _merge(found, staging if dest in ("", ".") else staging / dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the check ----------------------------------------------------------------------------------
def check_layout(source: DataSource, root: Path, shown: Path | None = None) -> None:
    """The data checks ``mtlkit validate`` makes on ``source.recipe`` with its ``source.dataset``
    data read from ``root``, plus each split's first sample. ``shown``: the path errors name."""
    from .preflight import prepare
    from .recipe.loader import load_recipe
    from .recipe.toml_writer import toml_value

    if source.recipe is None:
        return
    recipe = load_recipe(source.recipe).recipe
    value = toml_value(str(root))
    overrides = ["training.device=cpu"]
    if recipe.data is not None and recipe.data.name == source.dataset:
        overrides.append(f"data.params.root={value}")
    overrides += [f"tasks.{t}.data.params.root={value}" for t, spec in recipe.tasks.items()
                  if spec.data is not None and spec.data.name == source.dataset]
    if len(overrides) == 1:
        raise PluginError(f"data source '{source.dataset}' (plugin '{source.plugin}'): recipe '{source.recipe}' "
                          f"reads no '{source.dataset}' data set")
    try:
        prepare(load_recipe(source.recipe, overrides=overrides), meta=True, init=False,
                synthetic_hint=False)  # it reads each split's first sample
    except MtlkitError as exc:
        text = str(exc).replace(str(root), str(shown or root))
        raise type(exc)(f"{shown or root}: the unpacked data fail the check: {text}") from None


def fetch(dataset: str | DataSource, root: str | os.PathLike, urls: Sequence[str] = (),
          archives: Sequence[str] = (), download_dir: str | os.PathLike | None = None, keep_archives: bool = False,
          retries: int = 3, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> Path:
    """Download (or take), verify, unpack and check ``dataset``'s release into ``root``."""
    sources = None if isinstance(dataset, DataSource) else data_sources()
    if sources is not None and dataset not in sources:
        raise ConfigError(f"data fetch: no declared source for data set '{dataset}'{did_you_mean(dataset, sources)} "
                          f"(known: {', '.join(sorted(sources)) or 'none'})")
    source = dataset if isinstance(dataset, DataSource) else sources[dataset]
    log = progress or (lambda message: None)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder; refusing to unpack {source.dataset} there")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: exists and is not empty; refusing to unpack {source.dataset} there")
    above = next((p for p in root.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise DataError(f"{root}: cannot create the folder: '{above}' is a file")
    url_for = _per_archive(urls, source, "--url")
    for url in url_for.values():
        _check_url(url)
    file_for = _per_archive(archives, source, "--from-archive")
    for name, file in file_for.items():
        if Path(file).is_dir():
            raise DataError(f"--from-archive {name}: '{file}' is a folder, not an archive file")
        if not Path(file).is_file():
            raise DataError(f"--from-archive {name}: '{file}' does not exist")
    ddir = Path(download_dir) if download_dir is not None else root.with_name(root.name + ".download")
    if ddir.exists() and not ddir.is_dir():
        raise DataError(f"--download-dir '{ddir}': is a file, not a folder")
    made_ddir = not ddir.exists()
    local: dict[str, Path] = {}
    downloaded: list[Path] = []
    try:
        for a in source.archives:
            if a.name in file_for:
                local[a.name] = Path(file_for[a.name])
                log(f"{a.name}: checking {local[a.name]}")
                try:
                    verify(local[a.name], a.size, a.sha256, str(local[a.name]))
                except OSError as exc:
                    raise DataError(f"--from-archive {a.name}: cannot read '{local[a.name]}' "
                                    f"({os_reason(exc)})") from None
                continue
            url = url_for.get(a.name, a.url)
            name = PurePosixPath(urlparse(url).path).name if a.name in url_for else ""
            log(f"{a.name}: downloading {url}" + (f" ({a.note})" if a.note else ""))
            local[a.name] = download(url, ddir / (name or a.file_name), a.size, a.sha256, retries=retries,
                                     timeout=timeout, log=log)
            downloaded.append(local[a.name])

        def fill(staging: Path) -> None:
            for a in source.archives:
                log(f"{a.name}: unpacking {local[a.name].name}")
                unpack(a, local[a.name], staging, source.dataset)
            log(f"{source.dataset}: checking the layout")
            check_layout(source, staging, shown=root)

        try:
            try:
                atomic_folder(root, fill)
            except OSError as exc:  # the disk (a read-only or full folder), not the data
                raise DataError(f"{root}: cannot create the folder ({os_reason(exc)})") from None
        except MtlkitError as exc:
            if not downloaded:
                raise
            raise type(exc)(f"{exc} (the downloads stay in {ddir} for the next try)") from None
    finally:
        if made_ddir and ddir.is_dir() and not any(ddir.iterdir()):
            ddir.rmdir()  # a refused download leaves no empty folder behind
    if not keep_archives:
        for path in downloaded:
            path.unlink(missing_ok=True)
        if made_ddir and ddir.is_dir() and not any(ddir.iterdir()):
            ddir.rmdir()
    return root
