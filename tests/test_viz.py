"""Overlay panels: exact pixel layout, palette colours, the clims-viz stage writing one PNG per picked id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cam_fixtures import write_cam_files, write_voc_root
from PIL import Image

from clims_pl.data.imageio import VOC_PALETTE, save_label_png
from clims_pl.refine.diagnostics import save_diag
from clims_pl.stages.viz import run
from clims_pl.viz import GAP, TITLE_HEIGHT, grid_to_image, heat_overlay, overlay_panel, pick_ids, refinement_panel

NAMES = ["background", *(f"class{i}" for i in range(1, 21))]


def test_panel_layout_and_colours() -> None:
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    gt = np.zeros((40, 60), dtype=np.uint8)
    gt[10:30, 20:40] = 3
    high_res = np.zeros((2, 40, 60), dtype=np.float32)
    high_res[0, 10:30, 20:40] = 1.0  # class key 2 (label 3) where the gt object is
    panel = overlay_panel(image, gt, high_res, np.array([2, 7]), NAMES, threshold=0.15)
    assert panel.size == (5 * 60 + 4 * GAP, 40 + TITLE_HEIGHT)  # image, gt, 2 CAMs, prediction
    pixels = np.asarray(panel)
    gt_x, pred_x = 60 + GAP, 4 * (60 + GAP)
    assert tuple(pixels[TITLE_HEIGHT + 20, gt_x + 30]) == tuple(VOC_PALETTE[3])
    assert tuple(pixels[TITLE_HEIGHT + 20, pred_x + 30]) == tuple(VOC_PALETTE[3])
    assert tuple(pixels[TITLE_HEIGHT + 2, pred_x + 2]) == tuple(VOC_PALETTE[0])
    assert pixels[:TITLE_HEIGHT].min() == 0  # black title text was drawn


def test_heat_overlay_blends_colour_map() -> None:
    image = np.zeros((1, 2, 3), dtype=np.uint8)
    out = heat_overlay(image, np.array([[0.0, 1.0]]), alpha=1.0, cmap="gray")
    assert out.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_panel_shrinks_to_max_side_and_draws_missing_gt() -> None:
    panel = overlay_panel(
        np.zeros((50, 100, 3), np.uint8), None, np.zeros((0, 50, 100), np.float32), np.zeros(0, np.int64), NAMES,
        max_side=40,
    )  # fmt: skip
    assert panel.size == (3 * 40 + 2 * GAP, 20 + TITLE_HEIGHT)
    assert tuple(np.asarray(panel)[TITLE_HEIGHT + 5, 40 + GAP + 5]) == (128, 128, 128)


def test_run_writes_overlays_for_random_or_given_ids(tmp_path: Path, compose_cfg) -> None:
    shapes = {"2007_000001": (30, 45), "2007_000002": (36, 24), "2007_000003": (20, 20)}
    masks = write_voc_root(tmp_path / "voc", shapes)
    cams = write_cam_files(tmp_path / "run" / "cams", masks)
    base = [f"data.root={tmp_path / 'voc'}", f"run_dir={tmp_path / 'run'}", "viz.max_side=null"]
    paths = run(compose_cfg("viz", [*base, "viz.n=2"]))
    assert len(paths) == 2 and all(p.parent == tmp_path / "run" / "overlays" for p in paths)
    for path in paths:
        h, w = shapes[path.stem]
        k = len(cams[path.stem]["keys"])
        assert Image.open(path).size == ((3 + k) * w + (2 + k) * GAP, h + TITLE_HEIGHT)
    assert [p.stem for p in run(compose_cfg("viz", [*base, 'viz.ids=["2007_000003"]']))] == ["2007_000003"]
    with pytest.raises(ValueError, match="quote the ids"):
        run(compose_cfg("viz", [*base, "viz.ids=[2007_000003]"]))
    with pytest.raises(FileNotFoundError, match=r"no CAM file for viz\.ids"):
        pick_ids(tmp_path / "run" / "cams", ["nope"], 1)


def test_refinement_panel_tiles() -> None:
    image = np.full((16, 20, 3), 100, dtype=np.uint8)
    gt = np.zeros((16, 20), np.uint8)
    gt[4:12, 4:12] = 2
    ir = np.full((16, 20), 255, np.uint8)
    ir[6:10, 6:10] = 2
    edge = np.zeros((4, 5), np.float32)
    edge[1, 1] = 1.0  # stride-4 cell (1, 1) = pixels 4..7
    walked = np.zeros((1, 4, 5), np.float32)
    panel = refinement_panel(image, gt, np.zeros((1, 16, 20), np.float32), ir, edge, walked, gt)
    assert panel.size == (7 * 20 + 6 * GAP, 16 + TITLE_HEIGHT)  # image CAM IR edge walked pseudo gt
    pixels = np.asarray(panel)[TITLE_HEIGHT:]

    def at(tile: int, y: int, x: int) -> tuple[int, ...]:
        return tuple(pixels[y, tile * (20 + GAP) + x])

    assert at(2, 8, 8) == tuple(VOC_PALETTE[2]) and at(2, 0, 0) == tuple(VOC_PALETTE[255])  # IR label, unsure
    assert at(3, 5, 5) == (255, 255, 255) and at(3, 0, 0) == (0, 0, 0)  # edge map: white on the boundary cell
    assert at(5, 8, 8) == tuple(VOC_PALETTE[2]) and at(6, 1, 1) == tuple(VOC_PALETTE[0])  # pseudo label, gt


def test_run_writes_refinement_panels(tmp_path: Path, compose_cfg) -> None:
    shapes = {"2007_000001": (30, 45), "2007_000002": (36, 24)}
    masks = write_voc_root(tmp_path / "voc", shapes)
    cams = write_cam_files(tmp_path / "run" / "cams", masks)
    for image_id, mask in masks.items():
        save_label_png(tmp_path / "ir" / f"{image_id}.png", mask)
        save_label_png(tmp_path / "pseudo" / f"{image_id}.png", np.where(mask == 255, 0, mask))
    cam = torch.from_numpy(cams["2007_000001"]["cam"])
    walks = {"walked": cam, "oracle": cam, "no_edge": cam}
    save_diag(tmp_path / "diag" / "2007_000001.npz", cams["2007_000001"]["keys"], torch.rand(cam.shape[1:]), walks)
    base = [f"data.root={tmp_path / 'voc'}", f"run_dir={tmp_path / 'run'}", "viz.max_side=null"]
    refine = [f"viz.refinement.diag_dir={tmp_path / 'diag'}", f"viz.refinement.ir_label_dir={tmp_path / 'ir'}"]
    with pytest.raises(ValueError, match=r"also set viz\.refinement\.pseudo_dir"):
        run(compose_cfg("viz", [*base, *refine]))
    refine.append(f"viz.refinement.pseudo_dir={tmp_path / 'pseudo'}")
    paths = run(compose_cfg("viz", [*base, *refine]))  # only ids with a diagnostics file are drawn
    assert [p.stem for p in paths] == ["2007_000001"]
    assert Image.open(paths[0]).size == (7 * 45 + 6 * GAP, 30 + TITLE_HEIGHT)


def test_grid_to_image_cell_size_follows_the_grid() -> None:
    grid = np.arange(4.0).reshape(2, 2)
    # a stride-4 grid of a 7 px image: 4 px cells, cropped; a grid twice as fine (pseudo.scale=2): 2 px cells
    np.testing.assert_array_equal(grid_to_image(grid, (7, 7))[:, :4], [[0.0] * 4] * 4 + [[2.0] * 4] * 3)
    np.testing.assert_array_equal(grid_to_image(grid, (4, 4)), np.kron(grid, np.ones((2, 2))))
