"""Refinement diagnostics on tiny inputs with hand-counted answers: boundary P/R/F, IR-label precision, the
oracle / no-edge walks, the all-background floor and the demo's refinement rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clims_pl.data.imageio import save_label_png
from clims_pl.metrics import (
    boundary_cells,
    boundary_counts,
    boundary_scores,
    confident_confusion,
    miou_from_confusion,
    oracle_edges,
    pair_confusion,
    summarise_confident,
)
from clims_pl.refine.diagnostics import diagnostic_walks, gt_boundary
from clims_pl.refine.random_walk import walk_to_label
from clims_pl.stages.demo import all_background_miou, refinement_diagnostics, refinement_table


def test_boundary_cells_by_hand() -> None:
    grid = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    # every cell touches the 2x2 object (4-neighbours) except the four corners
    expected = np.ones((4, 4), bool)
    expected[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    np.testing.assert_array_equal(boundary_cells(grid), expected)
    # a void (255) band is the boundary; a cell is not marked for differing from a void neighbour
    band = np.array([[0, 255, 1, 1]])
    np.testing.assert_array_equal(boundary_cells(band), [[False, True, False, False]])


def test_oracle_edge_map_scores_one_and_empty_map_recall_zero() -> None:
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 12:28] = 3  # a 16x16 object: a 4x4 block of cells on the 8x10 stride-4 grid
    grid, boundary = gt_boundary(mask, (8, 10))
    # the object's 12 perimeter cells and the 16 background cells 4-adjacent to it
    assert grid.shape == (8, 10) and boundary.sum() == 12 + 16
    oracle = boundary.astype(np.float32)  # edge = 1 on the boundary cells, 0 elsewhere
    assert boundary_scores(boundary_counts(oracle > 0.5, boundary)) == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    empty = boundary_scores(boundary_counts(np.zeros((8, 10), bool), boundary))
    assert empty == {"precision": None, "recall": 0.0, "f": 0.0}


def test_boundary_tolerance_of_one_cell() -> None:
    gt = np.zeros((6, 6), bool)
    gt[:, 2] = True
    shifted = np.roll(gt, 1, axis=1)  # the same line one cell to the right
    assert boundary_scores(boundary_counts(shifted, gt, tolerance=1))["f"] == 1.0
    assert boundary_scores(boundary_counts(shifted, gt, tolerance=0))["f"] == 0.0
    far = np.roll(gt, 2, axis=1)
    half = np.concatenate([shifted[:3], far[3:]])  # top half 1 cell away, bottom half 2 cells away
    # precision 3/6; recall 4/6: row 3's true cell is diagonal to the prediction of row 2. F = 2·(1/2)(2/3)/(7/6)
    scores = boundary_scores(boundary_counts(half, gt))
    assert scores == {"precision": 0.5, "recall": pytest.approx(2 / 3), "f": pytest.approx(4 / 7)}


def test_ir_label_precision_hand_count() -> None:
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1  # 16 pixels of class 1
    gt[7, 7] = 255  # skipped
    label = np.full((8, 8), 255, np.uint8)
    label[0:2, :] = 0  # 16 confident background pixels, all right
    label[2:4, 2:6] = 1  # 8 confident class-1 pixels, right
    label[6, 0:4] = 1  # 4 confident class-1 pixels on background, wrong
    label[4, 2:4] = 0  # 2 confident background pixels on the object, wrong
    label[7, 6:8] = 2  # class 2 on background (one pixel) and on the skipped pixel
    conf = confident_confusion(label, gt, num_classes=3)
    result = summarise_confident(conf, ["background", "a", "b"])
    assert result["pixels"] == 63
    assert result["fg_precision"] == pytest.approx(8 / 13)  # 8 right of 8 + 4 + 1 confident foreground
    assert result["bg_precision"] == pytest.approx(16 / 18)
    assert result["fraction"]["unsure"] == pytest.approx((63 - 13 - 18) / 63)
    assert result["fg_recall"] == pytest.approx(8 / 16)
    assert result["per_class"]["a"] == {"fraction": pytest.approx(12 / 63), "precision": pytest.approx(8 / 12)}
    assert result["per_class"]["b"]["precision"] == 0.0


def test_oracle_walk_recovers_the_mask_better_than_no_edges() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1  # an object of 8x8 cells on the 16x16 grid
    cam = torch.zeros(1, 16, 16)
    cam[0, 6:10, 6:10] = 1.0  # the CAM sees only the object's centre
    walks = diagnostic_walks(cam, torch.zeros(16, 16), mask, radius=5, beta=10.0, exp_times=4)

    def miou(walked: torch.Tensor) -> float:
        label = walk_to_label(walked, np.array([0]), mask.shape, bg_threshold=0.2)
        return miou_from_confusion(pair_confusion(label, mask, 2))[0]

    oracle, no_edge = miou(walks["oracle"]), miou(walks["no_edge"])
    # Without edges the walk spreads the CAM over the whole 16x16 grid (radius 5 reaches everywhere) and every
    # pixel is foreground: background IoU 0, object IoU 32²/64².
    assert no_edge == pytest.approx((0 + 32 * 32 / 64**2) / 2)
    # With the (one-sided) oracle the background ring of cells 3 and 12 is the edge: the walk fills the object's
    # cells 4..11 evenly and stops; bilinear ×4 then crosses 0.2·max at pixels 15..48 (34 px, the object is 32):
    # object IoU 32²/34², background IoU (64² − 34²)/(64² − 32²).
    uniform = (32**2 / 34**2 + (64**2 - 34**2) / (64**2 - 32**2)) / 2
    assert oracle == pytest.approx(uniform, abs=0.01) and oracle > no_edge + 0.2


def test_oracle_edges_are_one_sided() -> None:
    grid = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 255]])
    # background next to an object, the lower class where two meet, and void cells; never an object's own ring
    expected = np.array([[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(oracle_edges(grid), expected)


def test_all_background_miou_hand_count(tmp_path: Path) -> None:
    a = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [255, 0, 0, 0]], np.uint8)
    b = np.full((2, 2), 2, np.uint8)
    for name, mask in (("a", a), ("b", b)):
        save_label_png(tmp_path / "SegmentationClass" / f"{name}.png", mask)
    # background IoU 11/19 (every counted pixel predicted background), classes 1 and 2 IoU 0, class 3 absent (NaN)
    assert all_background_miou(tmp_path, ["a", "b"], num_classes=4) == pytest.approx(100 * (11 / 19) / 3)


def test_demo_refinement_rows_from_stage_files(tmp_path: Path) -> None:
    (tmp_path / "ir" / "metrics").mkdir(parents=True)
    (tmp_path / "ps" / "metrics").mkdir(parents=True)
    ir = {"fg_precision": 0.9, "bg_precision": 0.8, "fraction": {"foreground": 0.2, "background": 0.5, "unsure": 0.3}}
    (tmp_path / "ir" / "metrics" / "ir_labels.json").write_text(json.dumps(ir))
    edges = {"precision": 0.5, "recall": 0.25, "f": 1 / 3, "mean_edge": {"object_interior": 0.1}}
    (tmp_path / "ps" / "metrics" / "irn_edges.json").write_text(json.dumps(edges))
    walks = {"no_walk": {"miou": 0.47}, "no_edge": {"miou": 0.2}, "oracle_edge": {"miou": 0.6}}
    (tmp_path / "ps" / "metrics" / "pseudo.json").write_text(json.dumps({"miou": 0.3, "diagnostics": walks}))
    diag = refinement_diagnostics(tmp_path, "ir", "ps")
    assert diag["ir_fg_precision"] == pytest.approx(90.0) and diag["edge_f"] == pytest.approx(100 / 3)
    assert diag["walk_oracle_edge_miou"] == pytest.approx(60.0) and diag["walk_no_walk_miou"] == pytest.approx(47.0)
    results = {"all_background_miou": 17.0, "pseudo_miou": 30.0, "seg_val_miou": None, "seg_val_crf_miou": None}
    table = refinement_table({**results, "diagnostics": diag})
    assert "| walk with oracle edges mIoU | 60.0 |" in table and "| IRN boundary P / R / F" in table
    # stages that did not run give empty figures, not errors
    assert refinement_diagnostics(tmp_path, None, "missing")["edge_f"] is None
