"""The core's one-line error helpers: an OS error's reason, and the file-system probes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from mtlkit.errors import DataError, os_reason
from mtlkit.fsprobe import is_dir, is_file


def test_os_reason_gives_one_short_reason_for_any_os_error():
    assert os_reason(PermissionError(errno.EACCES, "Permission denied", "/x")) == "Permission denied"
    assert os_reason(OSError("disk quota reached")) == "disk quota reached"  # no errno: its text
    assert os_reason(IsADirectoryError()) == "IsADirectoryError"  # nothing else: its type


@pytest.mark.parametrize("probe, method", [(is_dir, "is_dir"), (is_file, "is_file")])
def test_probes_answer_or_name_the_path_they_could_not_read(tmp_path, monkeypatch, probe, method):
    (tmp_path / "f").write_text("x")
    assert probe(tmp_path) is (method == "is_dir") and probe(tmp_path / "f") is (method == "is_file")
    assert probe(tmp_path / "missing") is False

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, method, denied)
    with pytest.raises(DataError) as err:
        probe(tmp_path / "x", "recipe field data.root: ")
    assert str(err.value) == f"recipe field data.root: {tmp_path / 'x'}: cannot be read (Permission denied)"
