"""clims-data download against tiny archives over file:// and a loopback HTTP server with Range support."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clims_pl.data.cli import main
from clims_pl.data.download import DownloadError, download_voc, extract_sbd, fetch
from clims_pl.data.toy import generate_toy
from clims_pl.data.voc import read_split


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A VOC-layout tar (VOCdevkit/VOC2012/...) and an SBD-style zip, built from a tiny toy world."""
    out = tmp_path_factory.mktemp("archives")
    world = generate_toy(out / "world", size=32, n_train_aug=6, n_train=2, n_val=2, progress=False)
    with tarfile.open(out / "VOCtrainval_11-May-2012.tar", "w") as tar:
        for path in sorted(world.rglob("*")):
            rel = path.relative_to(world)
            if rel.parts[0] not in ("SegmentationClassAug", "toy.json"):
                tar.add(path, arcname=f"VOCdevkit/VOC2012/{rel}", recursive=False)
    with zipfile.ZipFile(out / "SegmentationClassAug.zip", "w") as zf:
        for path in sorted((world / "SegmentationClassAug").glob("*.png")):
            zf.write(path, f"SegmentationClassAug/{path.name}")
            zf.writestr(f"__MACOSX/SegmentationClassAug/._{path.name}", b"resource fork")
    return {"voc": out / "VOCtrainval_11-May-2012.tar", "sbd": out / "SegmentationClassAug.zip"}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _Server:
    """Serves files from memory on 127.0.0.1, honouring ``Range: bytes=N-`` unless ``ranges`` is False."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.ranges, self.requests = files, True, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if server.ranges and self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(archives: dict[str, Path]) -> Iterator[_Server]:
    srv = _Server({f"/{p.name}": p.read_bytes() for p in archives.values()})
    yield srv
    srv.close()


def test_file_urls_give_a_valid_root(archives: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    kwargs = {"voc_md5": _md5(archives["voc"]), "sbd_md5": None, "progress": False}
    download_voc(root, voc_url=archives["voc"].as_uri(), sbd_url=archives["sbd"].as_uri(), **kwargs)
    assert read_split(root, "train") == ["toy_000000", "toy_000001"]
    assert len(read_split(root, "train_aug")) == 6
    assert not list((root / "SegmentationClassAug").glob("._*"))  # macOS forks skipped
    assert sorted(p.name for p in (tmp_path / "VOCdevkit" / "downloads").iterdir()) == [
        "SegmentationClassAug.zip",
        "VOCtrainval_11-May-2012.tar",
    ]
    assert not [p for p in root.iterdir() if p.name.startswith(".extract")]
    # A complete root is not downloaded again (these URLs would fail).
    download_voc(root, voc_url="http://127.0.0.1:9/none.tar", sbd_url="http://127.0.0.1:9/none.zip", **kwargs)


def test_http_resumes_a_partial_download(archives: dict[str, Path], server: _Server, tmp_path: Path) -> None:
    data = archives["voc"].read_bytes()
    half = len(data) // 2
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    (tmp_path / f"{dest.name}.part").write_bytes(data[:half])
    fetch(f"{server.url}/{dest.name}", dest, md5=_md5(archives["voc"]), progress=False)
    assert server.requests == [(f"/{dest.name}", f"bytes={half}-")]
    assert dest.read_bytes() == data and not (tmp_path / f"{dest.name}.part").exists()
    # A .part that already holds everything gets 416 from the server and is simply verified.
    dest.rename(tmp_path / f"{dest.name}.part")
    fetch(f"{server.url}/{dest.name}", dest, md5=_md5(archives["voc"]), progress=False)
    assert server.requests[-1] == (f"/{dest.name}", f"bytes={len(data)}-") and dest.read_bytes() == data


def test_http_server_without_ranges_restarts(archives: dict[str, Path], server: _Server, tmp_path: Path) -> None:
    server.ranges = False
    data = archives["sbd"].read_bytes()
    dest = tmp_path / "SegmentationClassAug.zip"
    (tmp_path / f"{dest.name}.part").write_bytes(b"garbage-prefix-" * 3)
    fetch(f"{server.url}/{dest.name}", dest, md5=_md5(archives["sbd"]), progress=False)
    assert dest.read_bytes() == data


def test_full_http_download_then_cli_check(
    archives: dict[str, Path], server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "VOC2012"
    argv = ["download", "voc", "--root", str(root), "--voc-url", f"{server.url}/{archives['voc'].name}"]
    argv += ["--sbd-url", f"{server.url}/{archives['sbd'].name}", "--voc-md5", _md5(archives["voc"])]
    assert main([*argv, "--delete-archives"]) == 0
    out = capsys.readouterr().out
    assert "VOC root ready" in out and "train_aug       6 ids" in out
    assert not any((tmp_path / "downloads").iterdir())


def test_bad_checksum_leaves_no_file(archives: dict[str, Path], server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    with pytest.raises(
        DownloadError, match=r"checksum mismatch for VOCtrainval_11-May-2012\.tar: md5 \w+, expected 0+"
    ):
        fetch(f"{server.url}/{dest.name}", dest, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_fast_with_advice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    code = main(["download", "voc", "--root", str(tmp_path / "r"), "--voc-url", f"http://127.0.0.1:{port}/v.tar"])
    assert code == 1 and time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot reach 127.0.0.1" in err
    assert f"copy {tmp_path / 'r'}, or pass --voc-url file:///path/to/v.tar" in err


def test_archives_with_wrong_content_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/../../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DownloadError, match="points outside the target folder"):
        download_voc(tmp_path / "root", voc_url=evil.as_uri(), voc_md5=None, sbd=False, progress=False)
    assert not (tmp_path / "escape.txt").exists()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no masks here")
    with pytest.raises(DownloadError, match="no SegmentationClassAug/ members"):
        extract_sbd(empty, tmp_path / "root", progress=False)
