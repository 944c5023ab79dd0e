"""CAM/label-dir evaluation on a tiny VOC-layout root: sweep vs separate runs, docs/reference.md#stage-h-pseudo-label-evaluation rules, the clims-eval stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cam_fixtures import write_cam_files, write_voc_root

from clims_pl.cams import CamFileError
from clims_pl.data.imageio import save_label_png
from clims_pl.evaluate import evaluate_cams, evaluate_label_dir, sweep_thresholds
from clims_pl.metrics import cam_prediction, miou_from_confusion, segmentation_confusion
from clims_pl.stages.evaluate import run

SHAPES = {"2007_000001": (23, 31), "2007_000002": (40, 17), "2007_000003": (16, 16)}


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict]:
    masks = write_voc_root(tmp_path / "voc", SHAPES)
    cams = write_cam_files(tmp_path / "run" / "cams", masks)
    return tmp_path, masks, cams


def test_sweep_thresholds_grid_is_exact_and_inclusive() -> None:
    grid = sweep_thresholds(0.05, 0.60, 0.01)
    assert len(grid) == 56 and grid[0] == 0.05 and grid[-1] == 0.6 and 0.15 in grid
    assert sweep_thresholds(0.1, 0.3, 0.1, include=[0.15]).tolist() == [0.1, 0.15, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"eval\.sweep"):
        sweep_thresholds(0.5, 0.1, 0.01)


def test_evaluate_cams_sweep_equals_separate_evaluations(run_dir: tuple) -> None:
    root, masks, cams = run_dir
    ids = list(SHAPES)
    result = evaluate_cams(root / "run" / "cams", root / "voc", ids, [0.1, 0.3, 0.5, 0.7], threshold=0.15)
    assert result["sweep"]["threshold"] == [0.1, 0.15, 0.3, 0.5, 0.7]  # the reported threshold joins the sweep
    separate = []
    for t in result["sweep"]["threshold"]:
        preds = [cam_prediction(cams[i]["high_res"], cams[i]["keys"], t) for i in ids]
        separate.append(miou_from_confusion(segmentation_confusion(preds, [masks[i] for i in ids]))[0])
    assert result["sweep"]["miou"] == separate
    assert result["miou"] == separate[1] and result["threshold"] == 0.15
    assert result["best_miou"] == max(separate)
    assert result["best_threshold"] == result["sweep"]["threshold"][int(np.argmax(separate))]
    assert 0.3 < result["miou"] < 1.0  # the noisy indicator CAMs are informative but imperfect


def test_corrupt_or_missing_cam_file_is_named(run_dir: tuple) -> None:
    root, _, _ = run_dir
    path = root / "run" / "cams" / "2007_000002.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CamFileError, match=r"2007_000002\.npz: unreadable"):
        evaluate_cams(root / "run" / "cams", root / "voc", list(SHAPES), [0.15])
    path.unlink()
    with pytest.raises(CamFileError, match="no such CAM file"):
        evaluate_cams(root / "run" / "cams", root / "voc", list(SHAPES), [0.15])


def test_label_dir_counts_255_as_background(run_dir: tuple) -> None:
    root, masks, _ = run_dir
    preds = {}
    for image_id, mask in masks.items():
        pred = np.where(mask == 255, 0, mask).astype(np.uint8)
        pred[-1, :] = 255  # unsure pixels → background (docs/reference.md#stage-h-pseudo-label-evaluation)
        pred[:, 0] = 3
        save_label_png(root / "pseudo" / f"{image_id}.png", pred)
        preds[image_id] = np.where(pred == 255, 0, pred)
    names = ["background", *(f"c{i}" for i in range(1, 21))]
    result = evaluate_label_dir(root / "pseudo", root / "voc", list(SHAPES), names)
    expected = segmentation_confusion(list(preds.values()), list(masks.values()))
    assert result["confusion"] == expected.tolist()
    assert result["miou"] == pytest.approx(miou_from_confusion(expected)[0], abs=0)


def test_run_writes_json_markdown_and_logs(run_dir: tuple, compose_cfg) -> None:
    root, _, _ = run_dir
    cfg = compose_cfg("eval", [f"data.root={root / 'voc'}", f"run_dir={root / 'run'}", "eval.sweep.step=0.05"])
    result = run(cfg)
    saved = json.loads((root / "run/metrics/cams.json").read_text())
    assert saved["miou"] == pytest.approx(result["miou"]) and saved["split"] == "train"
    assert saved["num_images"] == 3 and len(saved["sweep"]["threshold"]) == 12
    # the prompt bank's text names (docs/reference.md#class-names-in-prompts)
    assert "player" in saved["iou"] and "person" not in saved["iou"]
    markdown = (root / "run/metrics/cams.md").read_text()
    assert f"| mIoU @ 0.15 | {100 * result['miou']:.2f} |" in markdown
    with open(root / "run/csv/metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["cams/miou"]) == pytest.approx(result["miou"])
