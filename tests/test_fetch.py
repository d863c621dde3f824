"""``mtlkit data fetch``: small archives in the releases' layouts, served from a local HTTP
server on 127.0.0.1 (with Range support): an interrupted download is resumed (in the same
call, and in a later one), a bad checksum is refused with nothing left behind, an archive in
the wrong layout is named, ``--from-archive`` needs no network, and the Decathlon's three
archives (per-domain tars inside one) unpack into the official layout."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mtlkit.cli import main
from test_cli_bad_input import one_line_error


class Server:
    """Serves ``files`` (URL path -> bytes); ``drops[path]``: how many answers to cut off
    halfway; ``ranges``: honour ``Range: bytes=N-``; ``seen``: (path, Range header) asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, int] = {}
        self.ranges = True
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                wanted = self.headers.get("Range")
                server.seen.append((path, wanted))
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(wanted.split("=")[1].split("-")[0]) if wanted and server.ranges else 0
                if start >= len(data) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops.get(path, 0) > 0:
                    server.drops[path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees the body end early
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def zip_folder(folder: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"{prefix}/{p.relative_to(folder).as_posix()}")
    return buf.getvalue()


def tar_folder(folder: Path, prefix: str, gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        tf.add(folder, arcname=prefix)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nyuv2(tmp_path_factory) -> tuple[Path, bytes]:
    """A two-scene copy of the NYUv2 release's layout, and the zip of it (one top folder)."""
    from mtlkit.plugins.datasets.nyuv2 import tiny_nyuv2

    layout = tmp_path_factory.mktemp("layout") / "nyuv2"
    tiny_nyuv2(layout)
    return layout, zip_folder(layout, "nyuv2")


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_interrupted_download_is_resumed_in_the_same_call(nyuv2, server, tmp_path, capsys):
    layout, data = nyuv2
    server.files["/nyuv2.zip"] = data
    server.drops["/nyuv2.zip"] = 1
    root = tmp_path / "nyuv2"
    assert main(["data", "fetch", "nyuv2", str(root), "--url", server.url("/nyuv2.zip?dl=1")]) == 0
    assert server.seen == [("/nyuv2.zip", None), ("/nyuv2.zip", f"bytes={len(data) // 2}-")]
    assert same_tree(layout, root)  # exactly the release's files, in place
    assert leftovers(tmp_path) == ["nyuv2"]  # the archive and its download folder are gone

    from mtlkit.plugins.datasets.nyuv2 import NYUv2, NYUv2Params

    ds = NYUv2(NYUv2Params(root=str(root)), split="val")
    assert np.array_equal(ds[0]["image"].numpy().transpose(1, 2, 0), np.load(layout / "val" / "image" / "0.npy"))


def test_interrupted_download_is_resumed_by_the_next_call(nyuv2, server, tmp_path, capsys):
    _, data = nyuv2
    server.files["/nyuv2.zip"] = data
    server.drops["/nyuv2.zip"] = 1
    root, url = tmp_path / "nyuv2", server.url("/nyuv2.zip")
    one_line_error(capsys, ["data", "fetch", "nyuv2", str(root), "--url", url, "--retries", "0"],
                   "interrupted at byte", "run the same command again")
    part = tmp_path / "nyuv2.download" / "nyuv2.zip.part"
    assert part.read_bytes() == data[: len(data) // 2] and not root.exists()
    assert main(["data", "fetch", "nyuv2", str(root), "--url", url, "--keep-archives"]) == 0
    assert server.seen[-1] == ("/nyuv2.zip", f"bytes={len(data) // 2}-")
    assert (tmp_path / "nyuv2.download" / "nyuv2.zip").read_bytes() == data  # kept, and whole
    assert (root / "train" / "image" / "1.npy").is_file()


def test_a_server_that_ignores_range_is_read_again(nyuv2, server, tmp_path, capsys):
    _, data = nyuv2
    server.files["/nyuv2.zip"] = data
    server.drops["/nyuv2.zip"] = 1
    server.ranges = False
    assert main(["data", "fetch", "nyuv2", str(tmp_path / "n"), "--url", server.url("/nyuv2.zip")]) == 0
    assert len(server.seen) == 2 and (tmp_path / "n" / "val" / "normal" / "0.npy").is_file()


def test_bad_checksum_is_refused_and_nothing_is_left(nyuv2, server, tmp_path, capsys):
    from mtlkit.fetch import data_sources, fetch
    from mtlkit.errors import DataError

    _, data = nyuv2
    server.files["/nyuv2.zip"] = data
    declared = data_sources()["nyuv2"]
    wrong = dataclasses.replace(declared, archives=(dataclasses.replace(declared.archives[0], sha256="0" * 64),))
    with pytest.raises(DataError, match="sha256 .* does not match the published 0000"):
        fetch(wrong, tmp_path / "nyuv2", urls=[server.url("/nyuv2.zip")])
    assert leftovers(tmp_path) == []  # no root, no download folder, no .part
    # the Decathlon's published size and sha256, through the CLI: a wrong devkit is refused first
    server.files["/devkit.tar.gz"] = tar_folder(nyuv2[0], "decathlon-1.0", gz=True)
    one_line_error(capsys, ["data", "fetch", "decathlon", str(tmp_path / "dec"), "--url",
                            f"devkit={server.url('/devkit.tar.gz')}"], "published", "the download was removed")
    assert leftovers(tmp_path) == []
    assert [p for p, _ in server.seen] == ["/nyuv2.zip", "/devkit.tar.gz"]  # nothing else was fetched
    # a checksum that matches is accepted
    right = dataclasses.replace(declared, archives=(dataclasses.replace(
        declared.archives[0], sha256=hashlib.sha256(data).hexdigest(), size=len(data)),))
    assert fetch(right, tmp_path / "ok", urls=[server.url("/nyuv2.zip")]) == tmp_path / "ok"


def test_an_archive_in_the_wrong_layout_is_named(nyuv2, server, tmp_path, capsys):
    layout, _ = nyuv2
    server.files["/flat.zip"] = zip_folder(layout / "train", "images")  # no train/ or val/ folders
    one_line_error(capsys, ["data", "fetch", "nyuv2", str(tmp_path / "n"), "--url", server.url("/flat.zip")],
                   "flat.zip", "does not unpack to the nyuv2 layout", "'train/image'", "images/", "n.download")
    assert leftovers(tmp_path) == ["n.download"] and leftovers(tmp_path / "n.download") == ["flat.zip"]
    # train/image is there but a target folder is missing: the loader's own check names it, under ROOT
    partial = tmp_path.parent / f"{tmp_path.name}-partial"
    for split in ("train", "val"):
        for kind in ("image", "label", "depth", "normal"):
            if (split, kind) != ("val", "label"):
                (partial / split / kind).mkdir(parents=True)
                for f in (layout / split / kind).iterdir():
                    (partial / split / kind / f.name).write_bytes(f.read_bytes())
    server.files["/partial.zip"] = zip_folder(partial, "nyuv2")
    line = one_line_error(capsys, ["data", "fetch", "nyuv2", str(tmp_path / "n"), "--url",
                                   server.url("/partial.zip")], "fail the check", "val/label")
    assert str(tmp_path / "n" / "val" / "label") in line and ".tmp" not in line
    assert leftovers(tmp_path) == ["n.download"]  # no root, no half-unpacked folder


def test_from_archive_needs_no_network(nyuv2, tmp_path, capsys):
    layout, data = nyuv2
    (tmp_path / "mine.zip").write_bytes(data)
    assert main(["data", "fetch", "nyuv2", str(tmp_path / "n"), "--from-archive", str(tmp_path / "mine.zip")]) == 0
    assert same_tree(layout, tmp_path / "n")
    assert leftovers(tmp_path) == ["mine.zip", "n"]  # the user's archive is kept; nothing else
    one_line_error(capsys, ["data", "fetch", "nyuv2", str(tmp_path / "n"), "--from-archive",
                            str(tmp_path / "mine.zip")], "exists and is not empty")
    one_line_error(capsys, ["data", "fetch", "decathlon", str(tmp_path / "d"), "--from-archive",
                            str(tmp_path / "mine.zip")], "say which archive", "devkit, data, imagenet")
    one_line_error(capsys, ["data", "fetch", "nyu", str(tmp_path / "d")], "no declared source", "nyuv2")


def test_decathlon_archives_unpack_into_the_official_layout(tmp_path):
    """The declared devkit / data (one tar per domain inside) / imagenet archives, built from
    a written official layout, unpack back into it (checksums replaced by these files')."""
    from mtlkit.fetch import data_sources, fetch
    from mtlkit.plugins.decathlon.domains import DOMAINS
    from mtlkit.plugins.decathlon.synthetic import write_decathlon_layout

    release = tmp_path / "release"
    write_decathlon_layout(release, 1, 1, 1, image_size=16)
    files = {"devkit": tmp_path / "devkit.tar.gz", "data": tmp_path / "data.tar.gz",
             "imagenet": tmp_path / "imagenet.tar"}
    files["devkit"].write_bytes(tar_folder(release / "annotations", "decathlon-1.0/annotations", gz=True))
    inner = tmp_path / "inner"
    inner.mkdir()
    for d in DOMAINS:
        if d != "imagenet12":
            (inner / f"{d}.tar").write_bytes(tar_folder(release / "data" / d, d, gz=False))
    files["data"].write_bytes(tar_folder(inner, ".", gz=True))
    files["imagenet"].write_bytes(tar_folder(release / "data" / "imagenet12", "imagenet12", gz=False))
    declared = data_sources()["decathlon"]
    source = dataclasses.replace(declared, archives=tuple(
        dataclasses.replace(a, size=None, sha256=hashlib.sha256(files[a.name].read_bytes()).hexdigest())
        for a in declared.archives))
    root = fetch(source, tmp_path / "decathlon-1.0", archives=[f"{k}={v}" for k, v in files.items()])
    assert same_tree(release, root)


def test_members_outside_the_folder_are_refused(nyuv2, tmp_path, capsys):
    _, data = nyuv2
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("nyuv2/train/image/0.npy", b"x")
        zf.writestr("../outside.txt", b"x")
    one_line_error(capsys, ["data", "fetch", "nyuv2", str(tmp_path / "n"), "--from-archive", str(evil)],
                   "evil.zip", "'../outside.txt'", "outside the folder")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("nyuv2/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    from mtlkit.errors import DataError
    from mtlkit.fetch import Archive, unpack

    (tmp_path / "staging").mkdir()
    with pytest.raises(DataError, match="evil.tar: cannot unpack"):
        unpack(Archive(name="a", url="http://127.0.0.1/evil.tar", format="tar", places=(("link", "."),)),
               tmp_path / "evil.tar", tmp_path / "staging", "nyuv2")
    assert leftovers(tmp_path) == ["evil.tar", "evil.zip", "staging"] and leftovers(tmp_path / "staging") == []
