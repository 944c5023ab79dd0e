"""Download PASCAL VOC 2012 and the SBD augmented masks into the layout ``voc.validate_voc_root`` expects.

Downloads resume from ``<archive>.part`` with HTTP Range requests, are verified (md5) before they are renamed
to their final name, and are unpacked through a staging folder, so a killed run never leaves a corrupt
archive or a half-extracted folder under a final name. Only the standard library (urllib) is used; a short
connect timeout makes an offline machine fail in seconds with a message that says what to do instead.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, url2pathname, urlopen

from tqdm import tqdm

from clims_pl.data.voc import validate_voc_root

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
#: SBD masks as commonly distributed (DeepLab's "SegmentationClassAug", 12,031 PNGs = train_aug ∪ val).
SBD_URL = "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1"
#: To be confirmed: no published checksum could be verified for this archive, so by default it is checked by
#: the zip's own per-member CRCs during extraction. Pin one with ``--sbd-md5`` once known.
SBD_MD5: str | None = None
#: Seconds to wait for a connection (and between received chunks); small so an offline machine fails fast.
CONNECT_TIMEOUT = 10.0

_VOC_PREFIX = PurePosixPath("VOCdevkit/VOC2012")
_SBD_DIR = "SegmentationClassAug"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or extraction failed; the message is one line saying why and what to do."""


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 of a file, streamed (the VOC tar is 2 GB)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _open(url: str, offset: int, timeout: float, hint: str) -> Iterator[tuple[BinaryIO | None, int | None, int]]:
    """Open ``url`` from byte ``offset``; yield (stream, total size or None, offset actually served).

    The served offset is 0 when the server ignores the Range header (the caller then starts over) and the
    stream is None when the server says the range is past the end (the .part file is already complete).
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
        if not path.is_file():
            raise DownloadError(f"{url}: no such file")
        total = path.stat().st_size
        with open(path, "rb") as f:
            start = offset if offset <= total else 0
            f.seek(start)
            yield f, total, start
        return
    host = parsed.hostname or url
    headers = {"User-Agent": "clims-pl"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code != 416 or not offset:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}; {hint}") from err
        response = None  # 416 Range Not Satisfiable: the .part file already holds the whole file
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {host} ({reason}): {hint}") from err
    if response is None:
        yield None, None, offset
        return
    with response:
        length = response.headers.get("Content-Length")
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else None
            if total is None and length is not None:
                total = offset + int(length)
            yield response, total, offset
        else:
            yield response, int(length) if length is not None else None, 0


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
    hint: str = "check the URL and your connection",
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part``; verify ``md5`` (if given) before renaming.

    An existing ``dest`` that passes the check is reused. On a checksum mismatch the download is deleted (a
    corrupt .part would otherwise be 'resumed' forever) and DownloadError says so.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None or md5sum(dest) == md5:
            return dest
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    with _open(url, offset, timeout, hint) as (stream, total, start):
        if stream is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy(stream, part, start, total, dest.name, progress)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{dest.name}: got {size} of {total} bytes; run the same command again to resume")
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {dest.name}: md5 {got}, expected {md5}; the download was deleted — "
                "run again, or pass the mirror's checksum / --no-verify if the file legitimately differs"
            )
    os.replace(part, dest)
    return dest


def _copy(stream: BinaryIO, part: Path, start: int, total: int | None, name: str, progress: bool) -> None:
    """Append the stream to ``part`` from byte ``start`` (truncating when the server restarted at 0)."""
    with (
        open(part, "r+b" if start and part.exists() else "wb") as f,
        tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=name, disable=not progress) as bar,
    ):
        f.seek(start)
        f.truncate()
        try:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                f.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(
                f"download of {name} interrupted after {f.tell()} bytes ({err}); run the same command again to resume"
            ) from err


def _safe_relative(name: str, prefix: PurePosixPath) -> PurePosixPath | None:
    """Member path below ``prefix``, or None for other members; refuse paths that escape the target."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DownloadError(f"archive member {name!r} points outside the target folder: refusing to extract")
    if path.parts[: len(prefix.parts)] != prefix.parts or len(path.parts) == len(prefix.parts):
        return None
    return PurePosixPath(*path.parts[len(prefix.parts) :])


def _install(staging: Path, root: Path) -> None:
    """Move every top-level folder of ``staging`` into ``root``, replacing an older copy of that folder."""
    root.mkdir(parents=True, exist_ok=True)
    for child in sorted(staging.iterdir()):
        target = root / child.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(child, target)


@contextmanager
def _staging(root: Path, tag: str) -> Iterator[Path]:
    """A scratch folder inside ``root`` (same filesystem, so the final moves are renames), always removed."""
    staging = root / f".extract-{tag}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_voc(archive: str | os.PathLike, root: str | os.PathLike, *, progress: bool = True) -> None:
    """Unpack ``VOCdevkit/VOC2012/*`` of the VOC trainval tar directly into ``root``."""
    root = Path(root)
    try:
        with tarfile.open(archive) as tar, _staging(root, "voc") as staging:
            for member in tqdm(tar, desc="extract VOC", unit=" files", disable=not progress):
                rel = _safe_relative(member.name, _VOC_PREFIX)
                if rel is None or not (member.isfile() or member.isdir()):
                    continue
                target = staging / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            if not any(staging.iterdir()):
                raise DownloadError(f"{archive} has no {_VOC_PREFIX}/ folder: not the VOC2012 trainval tar")
            _install(staging, root)
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{archive} is not a readable tar ({err}): delete it and download again") from err


def extract_sbd(archive: str | os.PathLike, root: str | os.PathLike, *, progress: bool = True) -> None:
    """Unpack the ``SegmentationClassAug/*.png`` members (wherever they sit in the zip) into ``root``.

    Reading each member checks its CRC, which is what guards this archive while its md5 is unconfirmed.
    macOS resource forks (``__MACOSX/``, ``._*``) shipped in some copies are skipped.
    """
    root = Path(root)
    try:
        with zipfile.ZipFile(archive) as zf, _staging(root, "sbd") as staging:
            count = 0
            for info in tqdm(zf.infolist(), desc="extract SBD", unit=" files", disable=not progress):
                parts = PurePosixPath(info.filename).parts
                if info.is_dir() or "__MACOSX" in parts or _SBD_DIR not in parts or parts[-1].startswith("._"):
                    continue
                at = parts.index(_SBD_DIR)
                rel = _safe_relative("/".join(parts[at:]), PurePosixPath())
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                count += 1
            if count == 0:
                raise DownloadError(f"{archive} has no {_SBD_DIR}/ members: not the SBD augmented-mask zip")
            _install(staging, root)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive} is corrupt ({err}): delete it and download again") from err


def _archive_name(url: str) -> str:
    """File name of a URL without its query string (Dropbox links end in ``?dl=1``)."""
    return PurePosixPath(urlparse(url).path).name or "download"


def download_voc(
    root: str | os.PathLike,
    *,
    voc_url: str = VOC_URL,
    voc_md5: str | None = VOC_MD5,
    sbd_url: str = SBD_URL,
    sbd_md5: str | None = SBD_MD5,
    sbd: bool = True,
    verify: bool = True,
    download_dir: str | os.PathLike | None = None,
    delete_archives: bool = False,
    force: bool = False,
    timeout: float = CONNECT_TIMEOUT,
    progress: bool = True,
) -> Path:
    """Make ``root`` a complete VOC2012 root (+ SegmentationClassAug when ``sbd``) and return it.

    ``root`` is the folder that will hold JPEGImages/ (the same path as ``data.root``). Parts already present
    are skipped unless ``force``. Archives are kept in ``download_dir`` (default ``<root>/../downloads``) so a
    re-run does not download again, unless ``delete_archives``.
    """
    root = Path(root).expanduser()
    downloads = Path(download_dir) if download_dir is not None else root.parent / "downloads"
    offline = f"download on a machine with internet and copy {root}, or pass --{{flag}}-url file:///path/to/{{name}}"
    steps = [("voc", voc_url, voc_md5, extract_voc, lambda: _has_voc(root))]
    if sbd:
        steps.append(("sbd", sbd_url, sbd_md5, extract_sbd, lambda: (root / _SBD_DIR).is_dir()))
    for flag, url, md5, extract, present in steps:
        if present() and not force:
            continue
        name = _archive_name(url)
        archive = fetch(
            url,
            downloads / name,
            md5=md5 if verify else None,
            timeout=timeout,
            hint=offline.format(flag=flag, name=name),
            progress=progress,
        )
        extract(archive, root, progress=progress)
        if delete_archives:
            archive.unlink()
    return validate_voc_root(root, need_aug=sbd)


def _has_voc(root: Path) -> bool:
    try:
        validate_voc_root(root)
    except ValueError:
        return False
    return True
