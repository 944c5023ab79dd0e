"""Provenance: a stage whose inputs changed (or that is forced) recomputes everything; same inputs resume.

The pipeline test is issue 14's probe: toy_cam (2 steps) → its CAMs → eval, then the same with the upstream
``cam`` stage changed (``pipeline.set.cam.trainer.max_steps=4``) and with ``--from cam``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict
from test_demo import _tiny

from clims_pl import provenance
from clims_pl.io import atomic_write_json
from clims_pl.pipeline import run
from clims_pl.provenance import RECORD, ProvenanceError, claim, identity


def test_claim_keeps_same_record_clears_or_refuses_another(tmp_path: Path) -> None:
    folder = tmp_path / "labels"
    assert claim(folder, {"ckpt": "a"}, what="labels", owned=("*.png",)) is False  # empty: nothing to keep
    (folder / "1.png").write_text("from a")
    (folder / "notes.txt").write_text("not ours")
    assert claim(folder, {"ckpt": "a"}, what="labels", owned=("*.png",)) is True  # same inputs: resume
    with pytest.raises(ProvenanceError, match=rf"^{folder} holds labels made from other ckpt; pass overwrite=true"):
        claim(folder, {"ckpt": "b"}, what="labels", owned=("*.png",))
    assert (folder / "1.png").read_text() == "from a"
    assert claim(folder, {"ckpt": "b"}, what="labels", owned=("*.png",), overwrite=True) is False
    assert not (folder / "1.png").exists() and (folder / "notes.txt").exists()  # only its own files go
    assert json.loads((folder / RECORD).read_text()) == {"ckpt": "b"}
    (folder / "1.png").write_text("from b")
    assert claim(folder, {"ckpt": "b"}, what="labels", owned=("*.png",), fresh=True) is False  # forced
    assert not (folder / "1.png").exists()
    # Files of an unknown origin (no record) are not adopted either.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "2.png").write_text("?")
    with pytest.raises(ProvenanceError, match="unknown inputs"):
        claim(legacy, {"ckpt": "b"}, what="labels", owned=("*.png",))


def test_other_ranks_wait_for_rank_zero_to_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks started together (srun): a rank other than 0 must not list outputs rank 0 is about to delete."""
    atomic_write_json(tmp_path / RECORD, {"ckpt": "old"})
    (tmp_path / "a.npz").write_text("old CAM")
    monkeypatch.setattr(provenance.rank_zero_only, "rank", 1)

    def rank_zero() -> None:  # clears, then writes the new record, as claim does on rank 0
        time.sleep(0.5)
        (tmp_path / "a.npz").unlink()
        atomic_write_json(tmp_path / RECORD, {"ckpt": "new"})

    thread = threading.Thread(target=rank_zero)
    start = time.monotonic()
    thread.start()
    assert claim(tmp_path, {"ckpt": "new"}, what="CAMs", overwrite=True) is False
    thread.join()
    assert time.monotonic() - start >= 0.5 and not (tmp_path / "a.npz").exists()
    # Same record: nothing to wait for (a resume keeps the outputs on every rank).
    (tmp_path / "a.npz").write_text("new CAM")
    assert claim(tmp_path, {"ckpt": "new"}, what="CAMs") is True
    # Rank 0 never claims (it failed): a clear error after the wait instead of a hang.
    monkeypatch.setattr(provenance, "RANK_WAIT_S", 0.3)
    with pytest.raises(ProvenanceError, match="rank 0 did not claim"):
        claim(tmp_path, {"ckpt": "other"}, what="CAMs")


def test_identity_is_content_for_files_and_record_for_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert identity(a) == identity(b) == "7:" + __import__("hashlib").sha256(b"weights").hexdigest()[:16]
    b.write_bytes(b"weightz")
    assert identity(b) != identity(a)
    assert identity(tmp_path / "nothing") == "missing"
    claim(tmp_path / "cams", {"ckpt": identity(a)}, what="CAMs")
    before = identity(tmp_path / "cams")
    (tmp_path / "cams" / "x.npz").write_bytes(b"1")  # more files of the same provenance: the same inputs
    assert identity(tmp_path / "cams") == before and before.startswith("record:")


def _three_stages(root: Path) -> object:
    """toy_demo cut to cam → cams_cam → eval_cam at CI size."""
    cfg = compose_config("reproduce", root, ["experiment=toy_demo"])
    with open_dict(cfg):
        stages = cfg.pipeline.stages
        for name in list(stages):
            if name not in ("cam", "cams_cam", "eval_cam"):
                stages[name] = None
                cfg.pipeline.set.pop(name, None)
        for name in ("cam", "cams_cam", "eval_cam"):
            stages[name].overrides = [*stages[name].overrides, *_tiny(name)]
        stages.cams_cam.overrides.append("data.scales=[1.0]")
        stages.cam.overrides.append("trainer.log_every_n_steps=1")
    return cfg


def _cams(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / "cams_cam" / "cams").glob("*.npz")}


def test_upstream_change_and_from_recompute_everything_downstream(tmp_path: Path) -> None:
    cfg = _three_stages(tmp_path)
    run_dir = Path(cfg.run_dir)
    first = run(cfg)
    cams = _cams(run_dir)
    assert first["cam"]["metrics"]["global_step"] == 2 and first["cams_cam"]["finished"] and len(cams) == 16

    # cam retrains: every CAM is recomputed from the new checkpoint (none kept from the old one, which would leave
    # the mIoU unchanged).
    with open_dict(cfg):
        cfg.pipeline.set.cam = OmegaConf.create({"trainer": {"max_steps": 4}})
    second = run(cfg)
    assert second["cam"]["metrics"]["global_step"] == 4
    manifest = json.loads((run_dir / "cams_cam" / "cams" / "manifest.json").read_text())
    assert (manifest["computed"], manifest["skipped"]) == (16, 0)
    changed = _cams(run_dir)
    # All 16 were recomputed (manifest above); a few CAMs of this tiny net can repeat byte for byte after 2 more steps.
    same = [k for k in cams if changed[k] == cams[k]]
    assert changed.keys() == cams.keys() and len(same) <= len(cams) // 4, same
    assert second["eval_cam"]["inputs"] == {"cams_cam": second["cams_cam"]["outputs_fingerprint"]}
    # The evaluation names what it evaluated: the CAM folder's record (which checkpoint), not just its path.
    assert second["eval_cam"]["metrics"]["source_id"] != first["eval_cam"]["metrics"]["source_id"]

    # --from cam starts from step 0 in an emptied folder (it must not "resume" the finished last.ckpt and train
    # nothing): the csv log holds the new run's 4 steps only, the stray file is gone.
    stray = run_dir / "cam" / "stray.txt"
    stray.write_text("from the previous run")
    with open_dict(cfg):
        cfg.pipeline.from_stage = "cam"
    run(cfg)
    assert not stray.exists()
    rows = (run_dir / "cam" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = sorted(
        {int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]}
    )
    assert steps == [0, 1, 2, 3]
    manifest = json.loads((run_dir / "cams_cam" / "cams" / "manifest.json").read_text())
    assert manifest["computed"] == 16
