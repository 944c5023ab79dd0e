"""Confusion/mIoU against brute-force pixel counts, CAM predictions, and the one-pass threshold sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clims_pl.metrics import (
    cam_prediction,
    miou_from_confusion,
    segmentation_confusion,
    summarise_confusion,
    sweep_confusions,
    sweep_histogram,
)


def _random_pairs(rng: np.random.Generator, n: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps where class 2 never occurs, 7 is only predicted, 9 only in ground truth; ~15% ignore pixels."""
    gts, preds = [], []
    for _ in range(n):
        shape = tuple(rng.integers(5, 30, size=2))
        gt = rng.choice([0, 1, 3, 5, 9], size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.15] = 255
        gts.append(gt)
        preds.append(rng.choice([0, 1, 3, 5, 7], size=shape).astype(np.int64))
    return preds, gts


def test_confusion_and_iou_equal_brute_force_counts() -> None:
    preds, gts = _random_pairs(np.random.default_rng(0))
    conf = segmentation_confusion(preds, gts, num_classes=21)
    miou, iou = miou_from_confusion(conf)

    brute = np.zeros((21, 21), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        for (y, x), g in np.ndenumerate(gt):
            if g != 255:
                brute[g, pred[y, x]] += 1
    np.testing.assert_array_equal(conf, brute)

    expected = []
    for c in range(21):
        tp = sum(int(((g == c) & (p == c)).sum()) for p, g in zip(preds, gts, strict=True))
        in_gt = sum(int((g == c).sum()) for g in gts)
        in_pred = sum(int(((p == c) & (g != 255)).sum()) for p, g in zip(preds, gts, strict=True))
        union = in_gt + in_pred - tp
        expected.append(tp / union if union else math.nan)
        assert (math.isnan(iou[c]) and not union) or iou[c] == expected[-1]
    present = [v for v in expected if not math.isnan(v)]
    assert np.isnan(iou[2]) and iou[7] == 0.0 and iou[9] == 0.0  # absent → NaN; one-sided → 0
    assert len(present) == 6  # 0, 1, 3, 5, 7, 9
    assert miou == pytest.approx(math.fsum(present) / len(present), rel=1e-13)


def test_hand_computed_miou_ignores_255_and_skips_absent_classes() -> None:
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    miou, iou = miou_from_confusion(segmentation_confusion([pred], [gt], num_classes=4))
    # bg: tp 1, gt 2, pred 2 → 1/3; cls1: tp 2, gt 2, pred 3 → 2/3; cls2: tp 0 → 0; cls3 absent → NaN
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    assert miou == pytest.approx(1 / 3)


def test_bad_labels_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="ground truth has labels outside"):
        segmentation_confusion([np.zeros((2, 2), int)], [np.full((2, 2), 21)], num_classes=21)
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_confusion([np.zeros((2, 2), int)], [np.zeros((2, 3), int)])
    with pytest.raises(ValueError, match="prediction has labels outside"):
        segmentation_confusion([np.full((2, 2), 255)], [np.zeros((2, 2), int)])


def test_cam_prediction_maps_keys_and_ties_go_to_background() -> None:
    keys = np.array([2, 5])
    high_res = np.array([[[0.9, 0.1, 0.15, 0.3]], [[0.2, 0.05, 0.15, 0.7]]], dtype=np.float32)
    pred = cam_prediction(high_res, keys, threshold=0.15)
    # pixel 0 → class 2 (+1), pixel 1 → bg, pixel 2 ties with float32(0.15) → bg, pixel 3 → class 5 (+1)
    np.testing.assert_array_equal(pred, [[3, 0, 0, 6]])
    assert cam_prediction(np.zeros((0, 1, 3), np.float32), np.zeros(0, np.int64), 0.15).tolist() == [[0, 0, 0]]


def test_sweep_equals_separate_evaluation_per_threshold() -> None:
    rng = np.random.default_rng(1)
    thresholds = np.round(np.arange(0.05, 0.61, 0.01), 6)
    images = []
    for k in (1, 2, 3, 0):  # last image keeps no class: background everywhere
        shape = (int(rng.integers(8, 20)), int(rng.integers(8, 20)))
        keys = np.sort(rng.choice(20, size=k, replace=False)).astype(np.int64)
        high_res = rng.random((k, *shape)).astype(np.float32) * 0.7
        high_res[:, 0, :3] = np.float32(0.15)  # exact ties with a threshold
        gt = rng.choice([0, *(keys + 1)], size=shape).astype(np.uint8)
        gt[0, 0] = 255
        images.append((high_res, keys, gt))

    hist = sum(sweep_histogram(h, k, g, thresholds) for h, k, g in images)
    confusions = sweep_confusions(hist)
    assert confusions.shape == (len(thresholds), 21, 21)
    for i, t in enumerate(thresholds):
        separate = segmentation_confusion([cam_prediction(h, k, t) for h, k, _ in images], [g for *_, g in images])
        np.testing.assert_array_equal(confusions[i], separate, err_msg=f"threshold {t}")


def test_summary_fg_precision_recall_and_among_predfg_bg() -> None:
    conf = np.zeros((3, 3), dtype=np.int64)
    conf[0] = [10, 2, 3]  # 5 predicted-fg pixels are background
    conf[1] = [1, 6, 1]
    conf[2] = [4, 0, 8]
    s = summarise_confusion(conf, ["background", "a", "b"])
    pred_fg = 2 + 3 + 6 + 1 + 0 + 8
    assert s["among_predfg_bg"] == pytest.approx(5 / pred_fg)
    assert s["fg_precision"] == pytest.approx(15 / pred_fg)
    assert s["fg_recall"] == pytest.approx(15 / (8 + 12))
    assert s["iou"]["a"] == pytest.approx(6 / (8 + 8 - 6))
    assert s["fp_bg"] == pytest.approx(1 - 15 / (15 + 15 - 10))
    assert s["fn_bg"] == pytest.approx(1 - 15 / (15 + 15 - 10))
    assert s["pixels"] == int(conf.sum())
