"""Figures from the metrics files stages write: what each reads, and the report linking the PNGs beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clims_pl.plots import (
    CLASS_IOU_PNG,
    SWEEP_PNG,
    WALL_TIME_PNG,
    cam_sweeps,
    class_names,
    main,
    stage_class_iou,
)
from clims_pl.stages.report import run


def cams_result(peak: float) -> dict:
    """A CAM evaluation as clims-eval writes it: a 3-threshold sweep peaking at 0.2."""
    return {
        "kind": "cams",
        "threshold": 0.15,
        "miou": peak - 0.1,
        "best_threshold": 0.2,
        "best_miou": peak,
        "sweep": {"threshold": [0.1, 0.2, 0.3], "miou": [peak - 0.2, peak, None]},
        "class_names": ["background", "cow", "boat"],
        "iou": {"background": 0.8, "boat": peak, "cow": None},  # JSON files keep keys sorted
    }


def write_run(run_dir: Path) -> None:
    """A finished pipeline run: two CAM evaluations, pseudo labels, a DeepLab evaluation, their manifests."""
    files = {
        "eval_cam/metrics/cams.json": cams_result(0.4),
        "eval_clims/metrics/cams.json": cams_result(0.5),
        "pseudo/metrics/pseudo.json": {"kind": "labels", "miou": 0.6, "iou": {"background": 0.9, "boat": 0.3}},
        "pseudo/metrics/irn_edges.json": {"f": 0.7},
        "seg_eval/metrics/seg_val.json": {
            "plain": {"miou": 0.5, "class_iou": [0.75, 0.25, None]},
            "crf": {"miou": 0.55, "class_iou": [0.8, 0.3, None]},
        },
    }
    for rel, obj in files.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(json.dumps(obj))
    for stage, wall in (("eval_cam", 2.0), ("eval_clims", 3.0), ("pseudo", 60.0), ("seg_eval", 30.0)):
        manifest = {"stage": stage, "finished": True, "wall_s": wall, "config_hash": "h", "metrics": {}}
        (run_dir / stage / "manifest.json").write_text(json.dumps(manifest))


def test_figure_inputs_are_read_from_the_stage_files(tmp_path: Path) -> None:
    write_run(tmp_path)
    assert list(cam_sweeps(tmp_path)) == ["eval_cam", "eval_clims"]
    assert cam_sweeps(tmp_path)["eval_clims"]["sweep"]["miou"] == [0.3, 0.5, None]
    assert stage_class_iou(tmp_path / "pseudo") == {"pseudo": {"background": 0.9, "boat": 0.3}}
    assert list(stage_class_iou(tmp_path / "eval_cam")["eval_cam"]) == ["background", "cow", "boat"]
    assert class_names(tmp_path) == ["background", "cow", "boat"]
    assert stage_class_iou(tmp_path / "seg_eval", ["background", "boat", "cow"]) == {
        "seg_eval (plain)": {"background": 0.75, "boat": 0.25, "cow": None},
        "seg_eval (crf)": {"background": 0.8, "boat": 0.3, "cow": None},
    }
    # names of another length: indices, never a wrong name
    assert list(stage_class_iou(tmp_path / "seg_eval", ["background", "boat"])["seg_eval (crf)"]) == ["0", "1", "2"]


def test_report_links_the_figures_written_beside_it(tmp_path: Path, compose_cfg) -> None:
    run_dir = tmp_path / "pipe"
    write_run(run_dir)
    cfg = compose_cfg("report", [f"report.run_dir={run_dir}"])
    run(cfg)
    out = Path(cfg.paths.output_dir)
    md = (out / "report.md").read_text()
    for caption, name in (
        ("CAM threshold sweep", SWEEP_PNG),
        ("per-class IoU per stage", CLASS_IOU_PNG),
        ("stage wall times", WALL_TIME_PNG),
    ):
        assert f"![{caption}]({name})" in md
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(out.glob(".*.tmp"))


def test_report_without_metrics_draws_only_the_wall_times(tmp_path: Path, compose_cfg) -> None:
    run_dir = tmp_path / "pipe"
    (run_dir / "cam").mkdir(parents=True)
    (run_dir / "cam" / "manifest.json").write_text(json.dumps({"stage": "cam", "wall_s": 5.0, "metrics": {}}))
    cfg = compose_cfg("report", [f"report.run_dir={run_dir}"])
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / WALL_TIME_PNG).is_file() and not (out / SWEEP_PNG).exists() and not (out / CLASS_IOU_PNG).exists()
    assert "![stage wall times]" in (out / "report.md").read_text()


def test_demo_figure_from_a_demo_run_and_its_command(tmp_path: Path, capsys) -> None:
    """`make demo-figure` = `python -m clims_pl.plots RUN_DIR OUT`: sweeps + the first overlay panel per method."""
    write_run(tmp_path)
    out = tmp_path / "docs" / "demo.png"
    with pytest.raises(SystemExit, match=r"overlays/baseline/\*.png missing: run the demo first"):
        main([str(tmp_path), str(out)])
    for tag in ("baseline", "clims"):
        for image_id in ("toy_000001", "toy_000000"):
            (tmp_path / "demo" / "overlays" / tag).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (200, 50), "red").save(tmp_path / "demo" / "overlays" / tag / f"{image_id}.png")
    main([str(tmp_path), str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0] / 2  # sweep above two panels
