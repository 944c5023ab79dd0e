"""Semantic-segmentation metrics with the reference's chainercv conventions (docs/reference.md#stage-d-cam-evaluation, docs/reference.md#stage-h-pseudo-label-evaluation, docs/reference.md#evaluation-conventions).

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
* ``confident_confusion`` + ``summarise_confident`` → how much of a label map with an "unsure" value (IR labels)
  is confident, and how often the confident part is right.
* ``boundary_cells``, ``boundary_counts`` + ``boundary_scores`` → precision / recall / F of a boundary map against
  ground-truth class boundaries with a tolerance in cells (BSDS-like matching by dilation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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
    background and their nanmean over the foreground classes (eval_sem_seg, docs/reference.md#stage-h-pseudo-label-evaluation).
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


def confident_confusion(label: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C+1) int64 confusion of a label map whose ``ignore_index`` means "unsure" (column C); rows = ground truth.

    Ground-truth pixels equal to ``ignore_index`` are skipped, as in :func:`pair_confusion`.
    """
    unsure = np.where(np.asarray(label) == ignore_index, num_classes, label)
    conf = pair_confusion(unsure, gt, num_classes + 1, ignore_index)
    if conf[num_classes].any():
        raise ValueError(f"ground truth has labels outside [0, {num_classes}) other than ignore_index={ignore_index}")
    return conf[:num_classes]


def summarise_confident(conf: np.ndarray, names: Sequence[str]) -> dict:
    """JSON-ready summary of a :func:`confident_confusion` (C, C+1); ``names`` = C names, background first.

    ``fraction`` {foreground, background, unsure}: shares of the counted pixels labelled a class, 0, or unsure;
    ``fg_precision``: confident foreground pixels whose ground truth is that very class / confident foreground
    pixels; ``bg_precision``: pixels labelled 0 whose ground truth is 0 / pixels labelled 0; ``fg_recall`` /
    ``bg_recall``: the same correct pixels / ground-truth foreground (background) pixels; ``per_class`` {name:
    {fraction, precision}}. Ratios with a zero denominator are None.
    """
    conf = np.asarray(conf, dtype=np.int64)
    num_classes = len(conf)
    if len(names) != num_classes or conf.shape != (num_classes, num_classes + 1):
        raise ValueError(f"{len(names)} class names for a {conf.shape} confident-label confusion matrix")
    labelled, total, correct = conf.sum(axis=0), int(conf.sum()), np.diag(conf[:, :num_classes])
    fg_labelled, fg_correct = int(labelled[1:num_classes].sum()), int(correct[1:].sum())
    return {
        "fraction": {
            "foreground": _ratio(fg_labelled, total),
            "background": _ratio(int(labelled[0]), total),
            "unsure": _ratio(int(labelled[num_classes]), total),
        },
        "fg_precision": _ratio(fg_correct, fg_labelled),
        "bg_precision": _ratio(int(correct[0]), int(labelled[0])),
        "fg_recall": _ratio(fg_correct, int(conf[1:].sum())),
        "bg_recall": _ratio(int(correct[0]), int(conf[0].sum())),
        "per_class": {
            name: {"fraction": _ratio(int(labelled[c]), total), "precision": _ratio(int(correct[c]), int(labelled[c]))}
            for c, name in enumerate(names)
        },
        "pixels": total,
    }


def boundary_cells(grid: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(h, w) bool ground-truth boundary of a label grid: cells that are ``ignore_index`` (VOC draws its void band
    along object outlines) or whose label differs from that of a 4-neighbour that is not ``ignore_index``.

    A change between two classes therefore marks the cells on both sides; the image border is not a boundary.
    """
    grid = np.asarray(grid)
    ignored = grid == ignore_index
    out = ignored.copy()
    for axis in (0, 1):
        lo, hi = (slice(None, -1), slice(1, None)) if axis == 0 else (np.s_[:, :-1], np.s_[:, 1:])
        differ = grid[lo] != grid[hi]
        out[lo] |= differ & ~ignored[hi]
        out[hi] |= differ & ~ignored[lo]
    return out


def oracle_edges(grid: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(h, w) bool one-sided ground-truth boundary for the oracle walk: ``ignore_index`` cells, and cells next to a
    4-neighbour of a HIGHER label (not ``ignore_index``): the background ring around an object, or the lower
    class where two classes meet.

    Not :func:`boundary_cells`: the walk zeroes the CAM on edge cells and cuts them off, so a two-sided boundary
    would also delete each object's outer ring of cells — on a coarse stride-4 grid (thin objects) most of the
    object — and an "oracle" would then score below no walk at all.
    """
    grid = np.asarray(grid)
    ignored = grid == ignore_index
    out = ignored.copy()
    for axis in (0, 1):
        lo, hi = (slice(None, -1), slice(1, None)) if axis == 0 else (np.s_[:, :-1], np.s_[:, 1:])
        out[lo] |= (grid[lo] < grid[hi]) & ~ignored[hi]
        out[hi] |= (grid[hi] < grid[lo]) & ~ignored[lo]
    return out


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation by a (2r+1)² square: a max-pool of stride 1 (cells within Chebyshev distance ``radius``)."""
    padded = np.pad(np.asarray(mask, dtype=bool), radius)
    return sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1)).any(axis=(-2, -1))


def boundary_counts(pred: np.ndarray, gt: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """(4,) int64 [predicted cells near a true boundary, predicted cells, true cells near a prediction, true cells].

    "Near" = within ``tolerance`` cells (Chebyshev), matched by dilating the other map (BSDS-like, no one-to-one
    assignment). Counts of several images add up; :func:`boundary_scores` turns them into P / R / F.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"boundary map {pred.shape} and ground-truth boundary {gt.shape} differ in shape")
    return np.array(
        [(pred & dilate(gt, tolerance)).sum(), pred.sum(), (gt & dilate(pred, tolerance)).sum(), gt.sum()],
        dtype=np.int64,
    )


def boundary_scores(counts: np.ndarray) -> dict:
    """precision, recall and F (harmonic mean; 0 when either is 0) from summed :func:`boundary_counts`.

    Precision is None without predicted cells (recall is then 0 and F 0); recall and F are None without true
    boundary cells.
    """
    hit_pred, n_pred, hit_gt, n_gt = (int(v) for v in counts)
    precision, recall = _ratio(hit_pred, n_pred), _ratio(hit_gt, n_gt)
    if recall is None:
        f = None
    elif not precision or not recall:
        f = 0.0
    else:
        f = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f": f}


def deeplab_scores(conf: np.ndarray) -> dict[str, Any]:
    """The reference ``scores()`` from a (C, C) confusion (rows = ground truth).

    mIoU is the nanmean of IoU over the classes **present in the ground truth** (docs/reference.md#deeplab-test-and-crf), unlike the chainercv
    mIoU of the CAM / pseudo-label evaluation.
    """
    hist = np.asarray(conf, dtype=np.float64)
    diag, gt_sum, total = np.diag(hist), hist.sum(axis=1), hist.sum()
    iou = iou_from_confusion(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = diag / gt_sum
    present = gt_sum > 0
    freq = gt_sum / max(total, 1.0)

    def mean(values: np.ndarray) -> float | None:
        return float(np.nanmean(values)) if np.isfinite(values).any() else None

    return {
        "pixel_accuracy": float(diag.sum() / total) if total else None,
        "mean_accuracy": mean(acc_cls),
        "fw_iou": float((freq[present] * iou[present]).sum()),
        "miou": mean(iou[present]),
        "class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }
