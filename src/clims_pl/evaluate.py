"""CAM and label-map evaluation (reference stages D and H, docs/reference.md#stage-d-cam-evaluation and docs/reference.md#stage-h-pseudo-label-evaluation) as the ``clims-eval`` stage.

* ``evaluate_cams``: every CAM file of the evaluation split is read once; one per-pixel histogram per image gives
  the confusion matrix of every threshold of the sweep (``metrics.sweep_histogram``). Reports the reference
  threshold (0.15), the best one, per-class IoU (prompt-bank text names, as eval_cam prints them), foreground
  precision/recall and among_predfg_bg.
* ``evaluate_label_dir``: label PNGs (IR labels, pseudo labels) as eval_sem_seg: 255 → background, same confusion.

Both compare against VOC ``SegmentationClass`` of the split (255 ignored) and return a JSON-ready dict; ``run``
writes it to ``<run_dir>/metrics/<name>.json`` + ``.md`` and logs the scalars to the configured loggers.
Per-image predictions at a threshold: ``clims_pl.metrics.cam_prediction(high_res, keys, threshold)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clims_pl.cams import load_cam
from clims_pl.data.imageio import read_label_png
from clims_pl.metrics import (
    miou_from_confusion,
    pair_confusion,
    summarise_confusion,
    sweep_confusions,
    sweep_histogram,
)
from clims_pl.runtime import log_metrics
from clims_pl.tables import markdown_table, percent

log = logging.getLogger(__name__)


def sweep_thresholds(start: float, stop: float, step: float, include: Sequence[float] = ()) -> np.ndarray:
    """Sorted thresholds start, start+step, ..., stop (inclusive, rounded to 1e-6) plus ``include``."""
    if step <= 0 or stop < start:
        raise ValueError(f"eval.sweep: need step > 0 and stop >= start, got {start}..{stop} step {step}")
    count = math.floor((stop - start) / step + 1e-6) + 1
    grid = np.round(start + step * np.arange(count), 6)
    return np.unique(np.concatenate([grid, np.asarray(include, dtype=np.float64)]))


def display_names(classes: Sequence[str], prompts: str | os.PathLike | None = None) -> list[str]:
    """``background`` + the class names as the prompt bank words them (eval_cam prints these), else as given."""
    if prompts is None:
        return ["background", *classes]
    from clims_pl.prompts.bank import load_prompt_bank

    bank = load_prompt_bank(prompts, classes)
    return ["background", *(bank.text_name(c) for c in classes)]


def ground_truth(gt_root: str | os.PathLike, image_id: str) -> np.ndarray:
    """VOC ``SegmentationClass`` mask of ``image_id``; the one reader every evaluation and diagnostic uses, so a
    missing mask always gives the same one-line error (which split to evaluate instead). A COCO id reads
    ``mask/<split>/<number>.png`` (``clims-data coco-masks``)."""
    from clims_pl.data.coco import is_coco_id, load_coco_mask
    from clims_pl.data.voc import load_mask

    if is_coco_id(image_id):
        return load_coco_mask(gt_root, image_id)
    try:
        return load_mask(gt_root, image_id)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{Path(gt_root) / 'SegmentationClass' / (image_id + '.png')}: no ground truth for {image_id}; "
            "evaluate a split with SegmentationClass masks (eval.split=train or val)"
        ) from err


def evaluate_cams(
    cam_dir: str | os.PathLike,
    gt_root: str | os.PathLike,
    ids: Sequence[str],
    thresholds: Sequence[float],
    threshold: float = 0.15,
    names: Sequence[str] | None = None,
    num_classes: int = 21,
    progress: bool = False,
    num_threads: int = 1,
) -> dict[str, Any]:
    """mIoU of the CAMs in ``cam_dir`` over ``ids`` for every threshold (one pass, each file read once).

    ``num_threads`` > 1 overlaps images on threads (file reads, PNG decoding and most numpy steps release
    the GIL); the sum of integer histograms does not depend on the order. Returns the summary at ``threshold`` (``miou``, ``iou``, ``fg_precision``, ``fg_recall``,
    ``among_predfg_bg``, ...) plus ``best_threshold``, ``best_miou`` and ``sweep`` {threshold: [...], miou: [...]}.
    """
    if not ids:
        raise ValueError(f"no ids to evaluate in {cam_dir}")
    names = list(names) if names is not None else [str(c) for c in range(num_classes)]
    num_classes = len(names)
    grid = np.unique(np.concatenate([np.asarray(thresholds, dtype=np.float64), [threshold]]))

    def image_histogram(image_id: str) -> np.ndarray:
        cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
        try:
            return sweep_histogram(cams["high_res"], cams["keys"], ground_truth(gt_root, image_id), grid, num_classes)
        except ValueError as err:
            raise ValueError(f"{image_id}: {err}") from err

    histogram = np.zeros((len(grid) + 1, num_classes, num_classes), dtype=np.int64)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for part in tqdm(pool.map(image_histogram, ids), total=len(ids), desc="eval cams", disable=not progress):
            histogram += part
    confusions = sweep_confusions(histogram)
    sweep = [miou_from_confusion(conf)[0] for conf in confusions]
    at = int(np.flatnonzero(grid == threshold)[0])
    best = int(np.nanargmax(sweep)) if np.isfinite(sweep).any() else at
    return {
        "kind": "cams",
        "num_images": len(ids),
        "class_names": names,
        "threshold": float(threshold),
        **summarise_confusion(confusions[at], names),
        "best_threshold": float(grid[best]),
        "best_miou": None if math.isnan(sweep[best]) else sweep[best],
        "sweep": {"threshold": grid.tolist(), "miou": [None if math.isnan(v) else v for v in sweep]},
        "confusion": confusions[at].tolist(),
    }


def evaluate_label_dir(
    label_dir: str | os.PathLike,
    gt_root: str | os.PathLike,
    ids: Sequence[str],
    names: Sequence[str] | None = None,
    num_classes: int = 21,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU of ``<label_dir>/<id>.png`` as eval_sem_seg (docs/reference.md#stage-h-pseudo-label-evaluation): predicted 255 counts as background."""
    names = list(names) if names is not None else [str(c) for c in range(num_classes)]
    num_classes = len(names)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image_id in tqdm(ids, desc=f"eval {Path(label_dir).name}", disable=not progress):
        pred = read_label_png(Path(label_dir) / f"{image_id}.png").copy()
        pred[pred == 255] = 0
        try:
            conf += pair_confusion(pred, ground_truth(gt_root, image_id), num_classes)
        except ValueError as err:
            raise ValueError(f"{Path(label_dir) / image_id}.png: {err}") from err
    return {
        "kind": "labels",
        "num_images": len(ids),
        "class_names": names,
        **summarise_confusion(conf, names),
        "confusion": conf.tolist(),
    }


def metrics_markdown(result: dict[str, Any], title: str) -> str:
    """A markdown report: headline numbers, then per-class IoU (%)."""
    if result["kind"] == "cams":
        rows = [
            [f"mIoU @ {result['threshold']:.2f}", percent(result["miou"])],
            [f"best mIoU (threshold {result['best_threshold']:.2f})", percent(result["best_miou"])],
        ]
    else:
        rows = [["mIoU", percent(result["miou"])]]
    rows += [
        ["fg precision", percent(result["fg_precision"])],
        ["fg recall", percent(result["fg_recall"])],
        ["among_predfg_bg", percent(result["among_predfg_bg"])],
        ["images", result["num_images"]],
    ]
    per_class = [[name, percent(iou)] for name, iou in result["iou"].items()]
    lines = [f"# {title}", "", *markdown_table(["metric", "value"], rows), ""]
    return "\n".join(lines + markdown_table(["class", "IoU"], per_class)) + "\n"


def log_scalars(loggers: Sequence[Any], result: dict[str, Any], prefix: str) -> None:
    """Headline numbers and per-class IoU to every Lightning logger (one step, 0)."""
    keys = ("miou", "best_miou", "best_threshold", "fg_precision", "fg_recall", "among_predfg_bg")
    scalars = {f"{prefix}/{k}": result[k] for k in keys if result.get(k) is not None}
    scalars.update({f"{prefix}/iou/{name}": v for name, v in result["iou"].items() if v is not None})
    log_metrics(loggers, scalars, step=0, finalize=True)
