"""Atomic file writes shared by every stage, and the .npz caches read back from them (``cached_npz``).

Every artifact is written to a temporary name in the same folder and renamed into place, so a killed
process never leaves a half-written file under the final name: a reader either sees the old file, the
complete new one, or nothing. Resumable stages rely on this (an existing final name means 'finished').
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import socket
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Temp names carry the writer's host and pid, so a starting stage can tell its own stale temps from a live writer's.
_TEMP = re.compile(r"^\..+\.clims-(?P<host>.+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
#: A temp older than this is stale whoever wrote it (a writer on another host that died).
STALE_TEMP_S = 24 * 3600


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temp is created with mode 0o666 minus the umask, like any ``open(path, "w")``, so group members can read
    results written under a group-friendly umask (mkstemp's private 0o600 would stick after the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.clims-{socket.gethostname()}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temps of ``atomic_path`` in ``folder`` left by a killed writer (its pid is gone on this host, or the
    temp is older than a day); a concurrent writer's temps and files of other programs are left alone."""
    removed, host, now = 0, socket.gethostname(), time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        match = _TEMP.match(tmp.name)
        if match is None:
            continue
        try:
            old = now - tmp.stat().st_mtime > STALE_TEMP_S
        except FileNotFoundError:
            continue
        if old or (match["host"] == host and not _alive(int(match["pid"]))):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save plain numpy arrays (no pickles) as an uncompressed .npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def cached_npz(
    path: str | os.PathLike | None,
    read: Callable[[Mapping[str, np.ndarray]], T],
    build: Callable[[], dict[str, np.ndarray]],
) -> T:
    """``read`` of the .npz cache ``path``, or of ``build()``'s arrays, saved there atomically, when the cache is
    missing, unreadable (empty, not a zip) or rejected (``read`` raises ValueError or KeyError); ``path`` None: no
    cache.

    The caller's cache name must hash everything the arrays depend on: a readable cache is trusted.
    """
    if path is not None and Path(path).is_file():
        try:
            with np.load(path) as data:
                return read(data)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError):
            pass  # empty, truncated, unreadable or older cache: rebuild it below
    arrays = build()
    if path is not None:
        atomic_save_npz(path, **arrays)
    return read(arrays)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pending_pngs(ids: list[str], out_dir: Path, suffix: str = ".png") -> list[str]:
    """Ids without ``<out_dir>/<id><suffix>``; temp files of a killed writer (atomic writes) are removed first."""
    remove_stale_temps(out_dir)
    return [i for i in ids if not (out_dir / f"{i}{suffix}").is_file()]
