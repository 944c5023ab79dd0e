"""Semantic-segmentation metrics with the reference's chainercv conventions (§6, §10, §14.8).

Pure numpy functions, no I/O:

* ``segmentation_confusion(preds, gts, num_classes=21, ignore_index=255)`` → (C, C) int64, rows = ground truth,
  columns = prediction; ground-truth pixels equal to ``ignore_index`` are skipped (chainercv maps 255 to −1).
* ``miou_from_confusion(conf)`` → (mIoU, per-class IoU). IoU_c = diag / (row + col − diag); a class absent from
  both prediction and ground truth is NaN and the mean is a nanmean over all classes (chainercv), so it is
  excluded rather than counted as 0.
* ``cam_prediction(high_res, keys, threshold)`` → (H, W) class map of one CAM file, exactly as eval_cam: a
  constant background plane at ``threshold``, argmax, mapped through [0, keys + 1].
* ``sweep_histogram`` + ``sweep_confusions`` → the confusion matrices of many thresholds from one pass over the
  CAMs (each file's maps are reduced once; every threshold is read off a per-pixel histogram).
* ``summarise_confusion(conf, names)`` → mIoU, per-class IoU, foreground precision/recall, among_predfg_bg and the
  eval_sem_seg fp/fn figures, as a JSON-ready dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def _check_pair(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Mask of counted pixels; raises on shape mismatch or labels outside [0, num_classes)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = gt != ignore_index
    if valid.any():
        g, p = gt[valid], pred[valid]
        if g.min() < 0 or g.max() >= num_classes:
            raise ValueError(
                f"ground truth has labels outside [0, {num_classes}) other than ignore_index={ignore_index}"
            )
        if p.min() < 0 or p.max() >= num_classes:
            raise ValueError(f"prediction has labels outside [0, {num_classes}) on counted pixels")
    return valid


def pair_confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int = 21, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 confusion of one (H, W) prediction against its ground truth (rows = ground truth)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    valid = _check_pair(pred, gt, num_classes, ignore_index)
    flat = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_confusion(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    num_classes: int = 21,
    ignore_index: int = 255,
) -> np.ndarray:
    """(C, C) int64 confusion matrix summed over pairs of (H, W) integer label maps; rows = ground truth.

    Ground-truth pixels equal to ``ignore_index`` are skipped. Any other label outside [0, num_classes) in the
    ground truth or in a counted prediction pixel raises ValueError (chainercv would silently grow the matrix).
    """
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        conf += pair_confusion(pred, gt, num_classes, ignore_index)
    return conf


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU = diag / (row + col − diag); NaN where a class is absent from prediction and ground truth."""
    conf = np.asarray(conf, dtype=np.int64)
    diag = np.diag(conf)
    denominator = conf.sum(axis=1) + conf.sum(axis=0) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        return diag / denominator


def miou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) from a (C, C) confusion; mIoU is the nanmean (chainercv), NaN if every class is."""
    iou = iou_from_confusion(conf)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan
    return miou, iou


def cam_prediction(high_res: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) int64 class map of one image: argmax over [threshold, high_res...] mapped through [0, keys + 1].

    The background plane has high_res's dtype, like the reference's ``np.pad(..., constant_values=thr)``,
    so ties and float32 rounding of the threshold behave the same; ties go to background (first argmax).
    """
    high_res, keys = np.asarray(high_res), np.asarray(keys, dtype=np.int64)
    background = np.full((1, *high_res.shape[1:]), threshold, dtype=high_res.dtype)
    index = np.concatenate([background, high_res]).argmax(axis=0)
    return np.concatenate([[0], keys + 1])[index]


def sweep_histogram(
    high_res: np.ndarray,
    keys: np.ndarray,
    gt: np.ndarray,
    thresholds: np.ndarray,
    num_classes: int = 21,
    ignore_index: int = 255,
) -> np.ndarray:
    """(T+1, C, C) int64 histogram of (j, gt, foreground class) over the counted pixels of one image.

    For every pixel the prediction at threshold t is its best foreground class if its best CAM score m > t,
    else background; j = #thresholds below m, so the pixel is foreground exactly for the first j thresholds.
    One bincount per image therefore serves every threshold; ``sweep_confusions`` turns the (summed)
    histograms into per-threshold confusion matrices. ``thresholds`` must be sorted ascending.
    """
    high_res, keys, gt = np.asarray(high_res), np.asarray(keys, dtype=np.int64), np.asarray(gt)
    if high_res.shape[1:] != gt.shape or len(high_res) != len(keys):
        raise ValueError(f"CAM maps {high_res.shape} do not fit keys {keys.shape} and ground truth {gt.shape}")
    if ((gt < 0) | ((gt >= num_classes) & (gt != ignore_index))).any():
        raise ValueError(f"ground truth has labels outside [0, {num_classes}) other than ignore_index={ignore_index}")
    if len(keys) and (keys.min() < 0 or keys.max() + 1 >= num_classes):
        raise ValueError(f"keys {keys.tolist()} outside [0, {num_classes - 1})")
    # Flat bin (j, row, class) with ignored pixels in an extra row C that is dropped at the end: no boolean
    # masking (the slow part), every step in place.
    rows = np.where(gt == ignore_index, num_classes, gt).ravel()
    if len(keys):
        best, fg_class = _first_max(high_res.reshape(len(keys), -1), keys + 1)
        flat = np.searchsorted(np.asarray(thresholds).astype(high_res.dtype), best, side="left")
        flat *= num_classes + 1
    else:  # no class kept: background at every threshold (j = 0, class 0)
        flat, fg_class = np.zeros(rows.shape, dtype=np.int64), 0
    flat += rows
    flat *= num_classes
    flat += fg_class
    n_thr = len(thresholds)
    counts = np.bincount(flat, minlength=(n_thr + 1) * (num_classes + 1) * num_classes)
    return counts.reshape(n_thr + 1, num_classes + 1, num_classes)[:, :num_classes]


def _first_max(maps: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max over axis 0, ``labels`` of the argmax) with argmax's first-max tie rule.

    A K-step loop over the few kept classes is several times faster than a strided ``argmax(axis=0)``.
    """
    best, label = maps[0].copy(), np.full(maps.shape[1], labels[0], dtype=np.int64)
    for k in range(1, len(maps)):
        label[maps[k] > best] = labels[k]
        np.maximum(best, maps[k], out=best)
    return best, label


def sweep_confusions(histogram: np.ndarray) -> np.ndarray:
    """(T, C, C) confusion matrices, one per threshold, from a (summed) ``sweep_histogram``.

    At threshold index i the pixels with j > i keep their foreground class; those with j <= i go to the
    background column.
    """
    histogram = np.asarray(histogram, dtype=np.int64)
    tail = np.cumsum(histogram[::-1], axis=0)[::-1]  # tail[i] = sum over j >= i
    conf = tail[1:].copy()
    conf[:, :, 0] += np.cumsum(histogram.sum(axis=2), axis=0)[:-1]
    return conf


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _foreground_nanmean(values: np.ndarray) -> float | None:
    """Mean over the foreground classes (index >= 1) that are present; None when none is."""
    fg = values[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else None


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def summarise_confusion(conf: np.ndarray, names: Sequence[str]) -> dict:
    """JSON-ready summary of a (C, C) confusion; ``names`` = C names, background first.

    Keys: ``miou``; ``iou`` {name: IoU or None if absent}; ``fg_precision`` / ``fg_recall`` (class-agnostic:
    a pixel counts as correct foreground when both prediction and ground truth are any foreground class);
    ``among_predfg_bg`` = predicted-fg pixels whose ground truth is background / predicted-fg pixels (eval_cam);
    ``fp_bg`` / ``fn_bg`` / ``fp_fg`` / ``fn_fg`` = 1 − gt_sum/denominator and 1 − pred_sum/denominator for
    background and their nanmean over the foreground classes (eval_sem_seg, §10).
    """
    conf = np.asarray(conf, dtype=np.int64)
    if len(names) != len(conf):
        raise ValueError(f"{len(names)} class names for a {len(conf)}-class confusion matrix")
    miou, iou = miou_from_confusion(conf)
    gt_sum, pred_sum, diag = conf.sum(axis=1), conf.sum(axis=0), np.diag(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = gt_sum + pred_sum - diag
        fp, fn = 1.0 - gt_sum / denominator, 1.0 - pred_sum / denominator
    pred_fg, gt_fg, both_fg = int(pred_sum[1:].sum()), int(gt_sum[1:].sum()), int(conf[1:, 1:].sum())
    return {
        "miou": _nan_to_none(miou),
        "iou": {name: _nan_to_none(v) for name, v in zip(names, iou, strict=True)},
        "fg_precision": _ratio(both_fg, pred_fg),
        "fg_recall": _ratio(both_fg, gt_fg),
        "among_predfg_bg": _ratio(int(conf[0, 1:].sum()), pred_fg),
        "fp_bg": _nan_to_none(fp[0]),
        "fn_bg": _nan_to_none(fn[0]),
        "fp_fg": _foreground_nanmean(fp),
        "fn_fg": _foreground_nanmean(fn),
        "pixels": int(conf.sum()),
    }
