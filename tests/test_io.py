"""Atomic writes: files follow the umask (not mkstemp's 0600); only a dead writer's temps are cleaned up."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clims_pl.io import (
    STALE_TEMP_S,
    atomic_path,
    atomic_save_npz,
    atomic_write_text,
    cached_npz,
    remove_stale_temps,
)


@pytest.mark.parametrize(("umask", "mode"), [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_save_npz(tmp_path / "b.npz", x=np.zeros(2))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.npz").stat().st_mode) == mode


def test_only_a_dead_writers_temps_are_removed(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    dead = tmp_path / f".x.npz.clims-{host}-{child.pid}.0a1b2c3d.tmp"
    live = tmp_path / f".y.npz.clims-{host}-{os.getpid()}.0a1b2c3d.tmp"
    elsewhere = tmp_path / f".z.npz.clims-other-host-{child.pid}.0a1b2c3d.tmp"  # cannot tell: kept while young
    abandoned = tmp_path / ".w.npz.clims-other-host-1.0a1b2c3d.tmp"
    foreign = tmp_path / ".editor-swap.tmp"
    for path in (dead, live, elsewhere, abandoned, foreign):
        path.write_bytes(b"partial")
    day_ago = time.time() - STALE_TEMP_S - 60
    os.utime(abandoned, (day_ago, day_ago))
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, foreign))


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        assert tmp.name.startswith(f".out.bin.clims-{socket.gethostname()}-{os.getpid()}.")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_cached_npz_builds_once_and_rebuilds_an_unreadable_or_rejected_cache(tmp_path: Path) -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(3) * len(calls)}

    def read(data) -> list[int]:
        if data["x"].shape != (3,):
            raise ValueError("another shape")
        return data["x"].tolist()

    cache = tmp_path / "c" / "a.npz"
    assert cached_npz(cache, read, build) == [0, 1, 2] and len(calls) == 1
    assert cached_npz(cache, read, build) == [0, 1, 2] and len(calls) == 1  # read back, not built
    cache.write_bytes(b"PK\x03\x04 truncated")
    assert cached_npz(cache, read, build) == [0, 2, 4] and len(calls) == 2  # unreadable: rebuilt and saved
    cache.write_bytes(b"")
    assert cached_npz(cache, read, build) == [0, 3, 6] and len(calls) == 3  # empty: rebuilt
    atomic_save_npz(cache, x=np.zeros(5))
    assert cached_npz(cache, read, build) == [0, 4, 8] and len(calls) == 4  # rejected by read: rebuilt
    atomic_save_npz(cache, y=np.zeros(3))
    assert cached_npz(cache, read, build) == [0, 5, 10]  # a missing key: rebuilt
    with np.load(cache) as saved:
        assert saved["x"].tolist() == [0, 5, 10]
    assert cached_npz(None, read, build) == [0, 6, 12] and len(calls) == 6  # no cache: built every time
