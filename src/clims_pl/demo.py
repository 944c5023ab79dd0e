"""The demo's verdict on the toy world: does CLIMS beat the baseline CAM, and does it stop claiming the background?

Two numbers per method, both read from files the pipeline wrote:

* CAM mIoU on the evaluation split (best threshold of the sweep, and at the reference threshold), from each
  evaluation stage's ``metrics/cams.json``;
* the **co-occurring-background false-activation rate**: of the pixels showing class c's co-occurring background
  (boat ↔ water, ...) in images that contain c, the share the CAM labels as c — the shortcut CLIMS's BTM/CBS
  losses are meant to remove. It needs the toy world's per-pixel background maps (``ToyBackground/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from clims_pl.cams import load_cam
from clims_pl.data.toy import BACKGROUND_DIR, TOY_BACKGROUNDS, read_toy_meta
from clims_pl.data.voc import load_mask, read_split
from clims_pl.io import atomic_write_json, atomic_write_text
from clims_pl.metrics import cam_prediction
from clims_pl.pipeline import read_manifest
from clims_pl.runtime import prepare_run
from clims_pl.viz import write_overlays


def cobg_counts(pred: np.ndarray, gt: np.ndarray, background: np.ndarray, cobg: Sequence[int]) -> np.ndarray:
    """(C, 2) [claimed, total] pixel counts of one image.

    For each class c present in ``gt``: total = ground-truth background pixels whose texture is c's co-occurring
    background ``cobg[c]`` (an index into the background names); claimed = those of them predicted as c.
    """
    counts = np.zeros((len(cobg), 2), dtype=np.int64)
    present = {int(v) - 1 for v in np.unique(gt) if 0 < v <= len(cobg)}
    for c in present:
        region = (gt == 0) & (background == cobg[c])
        counts[c] = ((pred == c + 1) & region).sum(), region.sum()
    return counts


def cobg_false_activation(
    cam_dir: str | os.PathLike, root: str | os.PathLike, ids: Sequence[str], threshold: float
) -> dict[str, Any]:
    """Per-class and mean (over classes with any such pixels) false-activation rate in percent."""
    meta = read_toy_meta(root)
    if meta is None:
        raise ValueError(f"{root} is not a toy world (no toy.json): the co-occurring-background rate needs one")
    classes = meta["classes"]
    cobg = [TOY_BACKGROUNDS.index(meta["cooccurring"][c]) for c in classes]
    counts = np.zeros((len(classes), 2), dtype=np.int64)
    for image_id in ids:
        cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
        pred = cam_prediction(cams["high_res"], cams["keys"], threshold)
        background = np.asarray(Image.open(Path(root) / BACKGROUND_DIR / f"{image_id}.png"))
        counts += cobg_counts(pred, load_mask(root, image_id), background, cobg)
    per_class = {
        c: (100.0 * claimed / total if total else None) for c, (claimed, total) in zip(classes, counts, strict=True)
    }
    valid = [v for v in per_class.values() if v is not None]
    return {"mean": float(np.mean(valid)) if valid else None, "per_class": per_class, "threshold": threshold}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def demo_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| CAMs | mIoU best (thr) | mIoU @ ref thr | co-occurring-bg false activation (%) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_pct(r['miou_best'])} ({r['best_threshold']:.2f}) | {_pct(r['miou_ref'])} | "
            f"{_pct(r['cobg_fa'])} |"
        )
    return "\n".join(lines)


def _method_row(name: str, eval_dir: Path, cam_dir: Path, root: Path, ids: list[str]) -> dict[str, Any]:
    metrics = json.loads((eval_dir / "metrics" / "cams.json").read_text())
    fa = cobg_false_activation(cam_dir, root, ids, metrics["best_threshold"])
    return {
        "name": name,
        "miou_best": 100.0 * metrics["best_miou"],
        "best_threshold": metrics["best_threshold"],
        "miou_ref": 100.0 * metrics["miou"],
        "ref_threshold": metrics["threshold"],
        "cobg_fa": fa["mean"],
        "cobg_fa_per_class": fa["per_class"],
    }


def _stage_miou(run_dir: Path, stage: str | None, file: str, key: str = "miou") -> float | None:
    """mIoU (percent) at ``key`` (dotted path) of ``<run_dir>/<stage>/metrics/<file>``; None if not run."""
    path = run_dir / stage / "metrics" / file if stage else None
    if path is None or not path.is_file():
        return None
    value: Any = json.loads(path.read_text())
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else 100.0 * value


def run(cfg: DictConfig) -> dict[str, Any]:
    """Compare the baseline and CLIMS CAM stages of ``demo.run_dir``; write the table and ``demo_results.json``."""
    out = prepare_run(cfg)
    d = cfg.demo
    run_dir, root = Path(d.run_dir), Path(cfg.data.root)
    ids = read_split(root, cfg.data.eval_split)
    rows = [
        _method_row("baseline CAM", run_dir / d.baseline_eval, run_dir / d.baseline_cams / "cams", root, ids),
        _method_row("CLIMS", run_dir / d.clims_eval, run_dir / d.clims_cams / "cams", root, ids),
    ]
    wall = sum((read_manifest(p.parent) or {}).get("wall_s", 0.0) for p in run_dir.glob("*/manifest.json"))
    results = {
        "baseline_miou": rows[0]["miou_best"],
        "clims_miou": rows[1]["miou_best"],
        "baseline_miou_ref_thr": rows[0]["miou_ref"],
        "clims_miou_ref_thr": rows[1]["miou_ref"],
        "baseline_best_threshold": rows[0]["best_threshold"],
        "clims_best_threshold": rows[1]["best_threshold"],
        "baseline_cobg_fa": rows[0]["cobg_fa"],
        "clims_cobg_fa": rows[1]["cobg_fa"],
        "cobg_fa_per_class": {r["name"]: r["cobg_fa_per_class"] for r in rows},
        "pseudo_miou": _stage_miou(run_dir, d.get("pseudo_stage"), "pseudo.json"),
        "seg_val_miou": _stage_miou(run_dir, d.get("seg_stage"), "seg_val.json", "plain.miou"),
        "seg_val_crf_miou": _stage_miou(run_dir, d.get("seg_stage"), "seg_val.json", "crf.miou"),
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir),
    }
    table = demo_table(rows)
    extra = [f"pseudo labels (IRN random walk) mIoU: {_pct(results['pseudo_miou'])}"] if results["pseudo_miou"] else []
    if results["seg_val_miou"] is not None:
        extra.append(
            f"DeepLab on pseudo labels, val mIoU: {_pct(results['seg_val_miou'])} "
            f"(with dense CRF: {_pct(results['seg_val_crf_miou'])})"
        )
    text = "\n".join(
        [f"# clims-pl demo on the toy world ({len(ids)} {cfg.data.eval_split} images)", "", table, "", *extra]
    )
    atomic_write_text(out / "demo_table.md", text + "\n")
    atomic_write_json(out / "demo_results.json", results)
    names = ["background", *cfg.data.classes]
    for row, cams in ((rows[0], d.baseline_cams), (rows[1], d.clims_cams)):
        tag = "baseline" if row is rows[0] else "clims"
        write_overlays(
            run_dir / cams / "cams",
            root,
            ids[: d.overlays],
            out / "overlays" / tag,
            names,
            threshold=row["best_threshold"],
        )
    print(text)
    print(f"\nwritten: {out / 'demo_results.json'} (overlays in {out / 'overlays'})")
    return results
