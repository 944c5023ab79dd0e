"""The demo's verdict on the toy world: does CLIMS beat the baseline CAM, and does it stop claiming the background?

Two numbers per method, both read from files the pipeline wrote:

* CAM mIoU on the evaluation split (best threshold of the sweep, and at the reference threshold), from each
  evaluation stage's ``metrics/cams.json``;
* the **co-occurring-background false-activation rate**: of the pixels showing class c's co-occurring background
  (boat ↔ water, ...) in images that contain c, the share the CAM labels as c — the shortcut CLIMS's BTM/CBS
  losses are meant to remove. It needs the toy world's per-pixel background maps (``ToyBackground/``).

Then the refinement chain, also from the stages' files: pseudo-label and DeepLab mIoU beside the score of predicting
background everywhere, and the diagnostics of ``clims_pl.refine.diagnostics`` (IR-label precision, IRN boundary F,
the walk with oracle / no edges), with refinement overlay panels in ``overlays/refinement``. Last, the same
shortcut one level down: how often DeepLab gives an object its own class when the image shows (or lacks) the class's
co-occurring background, from the val predictions the DeepLab evaluation kept (``seg_eval.save_val``).
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
from clims_pl.metrics import cam_prediction, miou_from_confusion, segmentation_confusion
from clims_pl.pipeline import read_manifest
from clims_pl.plots import DEMO_PNG, demo_figure_of_run
from clims_pl.runtime import prepare_run
from clims_pl.stages.seg_eval import VAL_SUBDIR
from clims_pl.tables import dotted, markdown_table
from clims_pl.viz import write_overlays, write_refinement_overlays


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


def _cooccurring(root: str | os.PathLike) -> tuple[list[str], list[int]]:
    """The toy world's class names and, per class, the index of its co-occurring background texture."""
    meta = read_toy_meta(root)
    if meta is None:
        raise ValueError(f"{root} is not a toy world (no toy.json): the co-occurring-background figures need one")
    classes = meta["classes"]
    return classes, [TOY_BACKGROUNDS.index(meta["cooccurring"][c]) for c in classes]


def _background_map(root: str | os.PathLike, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(Path(root) / BACKGROUND_DIR / f"{image_id}.png"))


def context_counts(pred: np.ndarray, gt: np.ndarray, background: np.ndarray, cobg: Sequence[int]) -> np.ndarray:
    """(C, 2, 2) object-pixel counts of one image: [co-occurring background shown, not shown] × [correct, total].

    For each class c present in ``gt``: total = its object pixels, correct = those predicted as c; they are filed
    under "shown" when the image's visible background (``gt == 0``) has any pixel of c's co-occurring background
    ``cobg[c]``. A segmenter that tells a class by its usual surroundings is right on the first and wrong on the
    second (a cow on railroad called train): the DeepLab-level form of the co-occurrence shortcut.
    """
    counts = np.zeros((len(cobg), 2, 2), dtype=np.int64)
    present = {int(v) - 1 for v in np.unique(gt) if 0 < v <= len(cobg)}
    for c in present:
        obj = gt == c + 1
        shown = bool(((gt == 0) & (background == cobg[c])).any())
        counts[c, 0 if shown else 1] = ((pred == c + 1) & obj).sum(), obj.sum()
    return counts


def seg_context_accuracy(pred_dir: str | os.PathLike, root: str | os.PathLike, ids: Sequence[str]) -> dict[str, Any]:
    """Percent of object pixels a segmenter gives their own class, with and without the class's co-occurring
    background in the image, per class and averaged over classes; over the ``ids`` with a prediction PNG in
    ``pred_dir`` (``images`` says how many)."""
    classes, cobg = _cooccurring(root)
    counts = np.zeros((len(classes), 2, 2), dtype=np.int64)
    found = [i for i in ids if (Path(pred_dir) / f"{i}.png").is_file()]
    for image_id in found:
        pred = np.asarray(Image.open(Path(pred_dir) / f"{image_id}.png"))
        counts += context_counts(pred, load_mask(root, image_id), _background_map(root, image_id), cobg)
    result: dict[str, Any] = {"images": len(found), "per_class": {}}
    for k, key in enumerate(("with_cobg", "without_cobg")):
        per_class = {
            c: (float(100.0 * n[k, 0] / n[k, 1]) if n[k, 1] else None) for c, n in zip(classes, counts, strict=True)
        }
        valid = [v for v in per_class.values() if v is not None]
        result[key] = float(np.mean(valid)) if valid else None
        result["per_class"][key] = per_class
    return result


def cobg_false_activation(
    cam_dir: str | os.PathLike, root: str | os.PathLike, ids: Sequence[str], threshold: float
) -> dict[str, Any]:
    """Per-class and mean (over classes with any such pixels) false-activation rate in percent."""
    classes, cobg = _cooccurring(root)
    counts = np.zeros((len(classes), 2), dtype=np.int64)
    for image_id in ids:
        cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
        pred = cam_prediction(cams["high_res"], cams["keys"], threshold)
        counts += cobg_counts(pred, load_mask(root, image_id), _background_map(root, image_id), cobg)
    per_class = {
        c: (100.0 * claimed / total if total else None) for c, (claimed, total) in zip(classes, counts, strict=True)
    }
    valid = [v for v in per_class.values() if v is not None]
    return {"mean": float(np.mean(valid)) if valid else None, "per_class": per_class, "threshold": threshold}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def demo_table(rows: list[dict[str, Any]]) -> str:
    header = ["CAMs", "mIoU best (thr)", "mIoU @ ref thr", "co-occurring-bg false activation (%)"]
    cells = [
        [r["name"], f"{_pct(r['miou_best'])} ({r['best_threshold']:.2f})", _pct(r["miou_ref"]), _pct(r["cobg_fa"])]
        for r in rows
    ]
    return "\n".join(markdown_table(header, cells))


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


def _read_metrics(run_dir: Path, stage: str | None, file: str) -> dict[str, Any]:
    """``<run_dir>/<stage>/metrics/<file>`` as a dict; empty when the stage is not configured or has not run."""
    path = run_dir / stage / "metrics" / file if stage else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _stage_miou(run_dir: Path, stage: str | None, file: str, key: str = "miou") -> float | None:
    """mIoU (percent) at ``key`` (dotted path) of ``<run_dir>/<stage>/metrics/<file>``; None if not run."""
    value = dotted(_read_metrics(run_dir, stage, file), key)
    return None if value is None else 100.0 * value


def all_background_miou(root: str | os.PathLike, ids: Sequence[str], num_classes: int) -> float:
    """mIoU (percent) of predicting background everywhere on ``ids``: the floor every stage must clear."""
    gts = [load_mask(root, i) for i in ids]
    return 100.0 * miou_from_confusion(segmentation_confusion((np.zeros_like(g) for g in gts), gts, num_classes))[0]


def _seg_context(run_dir: Path, seg_stage: str | None, root: Path, val_ids: list[str]) -> dict[str, Any] | None:
    """:func:`seg_context_accuracy` of the val predictions the DeepLab evaluation stage kept (None: none kept)."""
    pred_dir = run_dir / seg_stage / VAL_SUBDIR / "plain" if seg_stage else None
    if pred_dir is None or not pred_dir.is_dir():
        return None
    return seg_context_accuracy(pred_dir, root, val_ids)


def refinement_diagnostics(run_dir: Path, ir_stage: str | None, pseudo_stage: str | None) -> dict[str, Any]:
    """Percent figures of the IR-label, IRN-edge and walk diagnostics the refinement stages wrote (None: absent)."""
    ir = _read_metrics(run_dir, ir_stage, "ir_labels.json")
    edges = _read_metrics(run_dir, pseudo_stage, "irn_edges.json")
    walks = _read_metrics(run_dir, pseudo_stage, "pseudo.json").get("diagnostics", {})

    def pct(value: float | None) -> float | None:
        return None if value is None else 100.0 * value

    return {
        "ir_fg_precision": pct(ir.get("fg_precision")),
        "ir_bg_precision": pct(ir.get("bg_precision")),
        "ir_fraction": {k: pct(v) for k, v in ir.get("fraction", {}).items()},
        "edge_precision": pct(edges.get("precision")),
        "edge_recall": pct(edges.get("recall")),
        "edge_f": pct(edges.get("f")),
        "edge_mean": edges.get("mean_edge", {}),
        **{f"walk_{k}_miou": pct(walks.get(k, {}).get("miou")) for k in ("no_walk", "no_edge", "oracle_edge")},
    }


def refinement_table(results: dict[str, Any]) -> str:
    """The refinement chain and its diagnostics, one row each (percent)."""
    d = results["diagnostics"]
    frac, mean = d["ir_fraction"], d["edge_mean"]

    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    rows = [
        ("all-background prediction mIoU (floor)", _pct(results["all_background_miou"])),
        (
            "IR labels: confident fg / bg / unsure pixels (%)",
            f"{_pct(frac.get('foreground'))} / {_pct(frac.get('background'))} / {_pct(frac.get('unsure'))}",
        ),
        (
            "IR labels: precision of confident fg / bg (%)",
            f"{_pct(d['ir_fg_precision'])} / {_pct(d['ir_bg_precision'])}",
        ),
        (
            "IRN boundary P / R / F (%, 1-cell tolerance)",
            f"{_pct(d['edge_precision'])} / {_pct(d['edge_recall'])} / {_pct(d['edge_f'])}",
        ),
        (
            "IRN mean edge: object / true boundary / background",
            f"{num(mean.get('object_interior'))} / {num(mean.get('boundary'))} / {num(mean.get('background'))}",
        ),
        ("labels without walk (CAMs upsampled) mIoU", _pct(d["walk_no_walk_miou"])),
        ("walk with no edges mIoU", _pct(d["walk_no_edge_miou"])),
        ("pseudo labels (walk with IRN edges) mIoU", _pct(results["pseudo_miou"])),
        ("walk with oracle edges mIoU", _pct(d["walk_oracle_edge_miou"])),
        ("DeepLab val mIoU / + dense CRF", f"{_pct(results['seg_val_miou'])} / {_pct(results['seg_val_crf_miou'])}"),
    ]
    context = results.get("seg_context")
    if context:
        rows.append(
            (
                f"DeepLab val: object pixels given their class, co-occurring bg in the image / not (%, "
                f"{context['images']} images)",
                f"{_pct(context['with_cobg'])} / {_pct(context['without_cobg'])}",
            )
        )
    return "\n".join(markdown_table(["refinement", "value"], rows))


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
        "all_background_miou": all_background_miou(root, ids, len(cfg.data.classes) + 1),
        "seg_context": _seg_context(run_dir, d.get("seg_stage"), root, read_split(root, cfg.data.val_split)),
        "diagnostics": refinement_diagnostics(run_dir, d.get("ir_labels_stage"), d.get("pseudo_stage")),
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir),
    }
    title = (
        f"# clims-pl demo on the toy world ({len(ids)} {cfg.data.eval_split} images; DeepLab on {cfg.data.val_split})"
    )
    text = "\n".join(
        [
            title,
            "",
            demo_table(rows),
            "",
            refinement_table(results),
        ]
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
    if d.get("pseudo_stage") and d.get("ir_labels_stage"):
        stage = run_dir / d.pseudo_stage
        dirs = {
            "cams": run_dir / d.clims_cams / "cams",
            "ir_labels": run_dir / d.ir_labels_stage / "ir_labels",
            "pseudo": stage / "pseudo",
            "diag": stage / "pseudo_diag",
        }
        shown = [i for i in ids if (dirs["diag"] / f"{i}.npz").is_file()][: d.overlays]
        write_refinement_overlays(dirs, root, shown, out / "overlays" / "refinement")
    if d.overlays:  # the figure shows the first overlay of each method
        demo_figure_of_run(run_dir, out / DEMO_PNG, d.baseline_eval, d.clims_eval, out / "overlays")
    print(text)
    print(f"\nwritten: {out / 'demo_results.json'}, {out / DEMO_PNG} (overlays in {out / 'overlays'})")
    return results
