"""The one atomic writer (mtlkit.atomic): a file or folder appears whole or not at all, and no
other module renames temp files into place itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtlkit.atomic import atomic_folder, atomic_write, atomic_write_text
from mtlkit.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def half_then_fail(fh):
        fh.write(b"new but incomplete")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    def fill(folder):
        (folder / "a").write_text("1")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_folder(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []
    atomic_folder(tmp_path / "out", lambda folder: (folder / "a").write_text("1"))
    assert (tmp_path / "out" / "a").read_text() == "1"
    with pytest.raises(DataError, match="not empty"):
        atomic_folder(tmp_path / "out", lambda folder: None)


def test_no_module_but_the_atomic_writer_renames_temp_files_into_place():
    """os.replace / os.rename and tempfile's mkstemp / mkdtemp are mtlkit.atomic's alone."""
    owned = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"), ("tempfile", "mkdtemp")}
    offenders = []
    for path in sorted((ROOT / "mtlkit").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py")):
        if path == ROOT / "mtlkit" / "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and (node.value.id, node.attr) in owned:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_written_files_and_folders_get_the_modes_open_and_mkdir_would_give(tmp_path):
    """The temp files are owner-only; the results must not be: a new file gets 0666 less the
    umask (as ``open`` gives), a replaced file keeps its own mode, a folder 0777 less the umask."""
    import os
    import stat

    from mtlkit.atomic import atomic_folder, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "a")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
        out = atomic_folder(tmp_path / "folder", lambda d: (d / "f").write_text("x"))
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
    finally:
        os.umask(old)
