"""What produced an artifact folder, so that nothing made from other inputs is silently reused.

Every stage that writes a folder (a pipeline stage dir, ``cams/``, ``ir_labels/``, ``pseudo/``, the test PNGs, a
training run's ``checkpoints/``) first *claims* it with a record: the hash of its own settings and the identity of
each input (a checkpoint's size and content hash, an upstream folder's record). ``claim`` keeps the folder only when
its ``provenance.json`` equals the new record, which is what lets a killed stage resume; a folder made from other
inputs is cleared (``overwrite``) or refused with a one-line error, never mixed with new files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from clims_pl.io import atomic_write_json

RECORD = "provenance.json"
log = logging.getLogger("clims_pl")


class ProvenanceError(RuntimeError):
    """A folder holds outputs made from other inputs and the caller did not allow clearing it."""


def fingerprint(paths: Iterable[Path]) -> str:
    """Cheap identity of files/folders: names, sizes and mtimes (a rewritten file gets a new mtime)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            else:
                h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:16]


def identity(path: str | Path) -> str:
    """What an input *is*: a file's size and content hash (a copied checkpoint keeps it, a retrained one does not);
    a folder's own record when it has one (what produced it), else its fingerprint; ``missing`` if absent."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        return f"{path.stat().st_size}:{h.hexdigest()[:16]}"
    if (path / RECORD).is_file():
        return "record:" + hashlib.sha256((path / RECORD).read_bytes()).hexdigest()[:16]
    if path.is_dir():
        return "files:" + fingerprint([path])
    return "missing"


def digest(record: Any) -> str:
    """16-hex sha256 of a JSON-ready record (keys sorted): the identity of what a result was made from."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig, ignore: Sequence[str] = ("logger",)) -> str:
    """Hash of the resolved config without the dotted keys of ``ignore`` (where a run logs, how often it saves ...
    do not change what it produces)."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(plain):
        for key in ignore:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(plain, parent) if parent else plain
            if isinstance(node, DictConfig) and leaf in node:
                node.pop(leaf)
    return hashlib.sha256(OmegaConf.to_yaml(plain).encode()).hexdigest()[:16]


def read_record(folder: Path, name: str = RECORD) -> dict[str, Any] | None:
    try:
        return json.loads((folder / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


#: How long a DDP rank other than 0 waits for rank 0 to claim a folder (seconds).
RANK_WAIT_S = 600.0


def _wait_for_record(folder: Path, name: str, record: Mapping[str, Any]) -> None:
    """Block until rank 0 has written ``record`` to ``folder/name`` (it does so after clearing the folder)."""
    deadline = time.monotonic() + RANK_WAIT_S
    while read_record(folder, name) != record:
        if time.monotonic() > deadline:
            raise ProvenanceError(
                f"rank {rank_zero_only.rank}: rank 0 did not claim {folder} within {RANK_WAIT_S:.0f} s "
                "(it writes provenance there once earlier outputs are cleared); see rank 0's log for its error"
            )
        time.sleep(0.2)


def claim(
    folder: str | Path,
    record: Mapping[str, Any],
    *,
    what: str,
    owned: Sequence[str] = ("*",),
    overwrite: bool = False,
    fresh: bool = False,
    name: str = RECORD,
) -> bool:
    """Make ``folder`` hold only outputs of ``record``; return True when earlier outputs were kept (a resume).

    ``owned``: glob patterns (relative to ``folder``) of the outputs the record covers; only those are ever
    deleted. ``name``: where the record is kept (relative to ``folder``). Earlier outputs are kept when the
    folder's record equals ``record`` and ``fresh`` is false; otherwise they are deleted if ``overwrite`` (or
    ``fresh``: a forced rerun), else a ProvenanceError names the folder and the fix.
    """
    folder = Path(folder)
    record = json.loads(json.dumps(dict(record), sort_keys=True, default=str))
    old = read_record(folder, name)
    existing = [p for pattern in owned for p in folder.glob(pattern) if p != folder / name]
    if rank_zero_only.rank != 0:  # DDP: rank 0 clears; the others only need its verdict
        if old != record:
            # Ranks started together (srun, torchrun) must not look at the outputs before rank 0 has cleared
            # them: a rank listing CAMs that rank 0 is about to delete would skip them.
            _wait_for_record(folder, name, record)
            return False
        return bool(existing) and not fresh
    if existing and old == record and not fresh:
        return True
    if existing:
        if not (overwrite or fresh):
            changed = sorted(k for k in {*record, *(old or {})} if (old or {}).get(k) != record.get(k))
            reason = f"other {', '.join(changed)}" if old else "unknown inputs (no provenance.json)"
            raise ProvenanceError(
                f"{folder} holds {what} made from {reason}; pass overwrite=true to recompute them all, "
                "or write to another run_dir"
            )
        log.warning(
            "%s: clearing %d earlier %s (%s)", folder, len(existing), what, "forced" if fresh else "inputs changed"
        )
        for path in existing:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    atomic_write_json(folder / name, record)
    return False
