"""Demo: the co-occurring-background false-activation count, and the whole toy pipeline at CI size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_PARAMS, compose_config
from omegaconf import open_dict

from clims_pl.pipeline import run
from clims_pl.stages.demo import cobg_counts, context_counts


def test_cobg_counts_by_hand() -> None:
    # 2 classes; class 0's co-occurring background is texture 5, class 1's is texture 7.
    gt = np.array([[0, 0, 1, 1], [0, 0, 0, 255], [0, 2, 0, 0]])
    bg = np.array([[5, 5, 5, 7], [5, 7, 7, 7], [7, 7, 7, 7]])
    pred = np.array([[1, 0, 1, 0], [1, 1, 0, 2], [1, 2, 2, 1]])
    counts = cobg_counts(pred, gt, bg, cobg=[5, 7])
    # class 0 (label 1): gt-background pixels on texture 5: (0,0),(0,1),(1,0) → predicted 1 at (0,0),(1,0).
    # class 1 (label 2): gt-background pixels on texture 7: (1,1),(1,2),(2,0),(2,2),(2,3) → predicted 2 at (2,2).
    np.testing.assert_array_equal(counts, [[2, 3], [1, 5]])
    # A class absent from the image counts nothing, whatever the prediction says.
    np.testing.assert_array_equal(cobg_counts(pred, np.where(gt == 2, 0, gt), bg, [5, 7])[1], [0, 0])


def test_context_counts_by_hand() -> None:
    # Class 0 (label 1) lives on texture 5, class 1 (label 2) on texture 7.
    gt = np.array([[1, 1, 0, 0], [1, 255, 0, 2], [0, 0, 2, 2]])
    bg = np.array([[7, 7, 7, 7], [7, 7, 7, 5], [7, 7, 5, 5]])
    pred = np.array([[1, 2, 0, 0], [2, 1, 0, 2], [0, 0, 0, 1]])
    counts = context_counts(pred, gt, bg, cobg=[5, 7])
    # Class 0: the visible background (gt == 0) is all texture 7, so its 3 object pixels (255 is not one) count
    # under "not shown"; 1 of them is predicted 1. Texture 5 under class 1's object does not count as shown.
    np.testing.assert_array_equal(counts[0], [[0, 0], [1, 3]])
    # Class 1: texture 7 is visible, so "shown"; of its 3 pixels (1,3) is predicted 2.
    np.testing.assert_array_equal(counts[1], [[1, 3], [0, 0]])
    # Without class 1 in the ground truth, nothing is counted for it.
    np.testing.assert_array_equal(context_counts(pred, np.where(gt == 2, 0, gt), bg, [5, 7])[1], [[0, 0], [0, 0]])


def _tiny(stage: str) -> list[str]:
    """CI-sized overrides per stage: small world, a few steps, small inputs."""
    data = [
        *(f"data.toy.{k}={v}" for k, v in TOY_PARAMS.items()),
        "data.crop_size=64",
        "data.resize_long=[48,80]",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.scales=[1.0,0.5]",
    ]
    short = ["trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false"]
    # The file the shared toyclip stage of toy_demo exports (under this test's cache folder).
    tiny_clip = "${paths.cache_dir}/toyclip/clims-toy-rn-seed0/toyclip.pt"
    per_stage = {
        "toyclip": [
            *short,
            "data.batch_size=8",
            "model.optim.warmup_steps=1",
            "toyclip.eval.per_kind=2",
            "toyclip.eval.scenes=4",
            "data.world.size=64",
            "data.crop_size=64",
            "data.resize_long=[48,80]",
        ],
        "cam": [*data, *short, "trainer.limit_val_batches=0"],
        "clims": [*data, *short, f"clip.pretrained={tiny_clip}"],
        "cams_clims": [*data, f"clip.pretrained={tiny_clip}"],
        # IRN and DeepLab read the world the CAM stages generated (their datamodules have no toy block);
        # IRN needs a stride-4 grid of at least 20 cells for its radius-10 path index.
        "irn": ["data.crop_size=96", "data.batch_size=4", "data.num_workers=0", *short],
        "seg": ["data.crop_size=64", "data.batch_size=4", "data.num_workers=0", *short],
        "ir_labels": [*data, "ir_labels.num_workers=1"],
        "seg_eval": [*data, "seg_eval.crf.params.iterations=1", "seg_eval.device=cpu"],
        "pseudo": [*data, "pseudo.device=cpu"],
        "report": [],
    }
    return per_stage.get(stage, data)


@pytest.mark.slow
def test_toy_demo_pipeline_at_ci_size(tmp_path: Path) -> None:
    cfg = compose_config("reproduce", tmp_path, ["experiment=toy_demo"])
    with open_dict(cfg):
        stages = cfg.pipeline.stages
        for name, node in stages.items():
            node.overrides = [*(node.get("overrides") or []), *_tiny(name)]
    manifests = run(cfg)
    assert all(m["finished"] for m in manifests.values())
    results = json.loads((Path(cfg.run_dir) / "demo" / "demo_results.json").read_text())
    for key in ("baseline_miou", "clims_miou", "baseline_cobg_fa", "clims_cobg_fa", "wall_s"):
        assert key in results
    # The refinement stages connect: their mIoUs reach the table (values are meaningless at 2 steps).
    assert results["pseudo_miou"] is not None and results["seg_val_miou"] is not None
    assert results["seg_val_crf_miou"] is not None and 0.0 < results["all_background_miou"] < 100.0
    # The DeepLab context row reads every kept val prediction.
    val_ids = (Path(cfg.paths.data_dir) / "toy" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert results["seg_context"]["images"] == len(val_ids) > 0
    # ... and so do their diagnostics, with the files they were read from and the refinement overlays.
    for stage, file in (("ir_labels", "ir_labels"), ("pseudo", "irn_edges"), ("pseudo", "pseudo")):
        assert (Path(cfg.run_dir) / stage / "metrics" / f"{file}.md").is_file()
    diag = results["diagnostics"]
    assert diag["ir_fg_precision"] is not None and diag["walk_oracle_edge_miou"] is not None
    assert diag["edge_recall"] is not None and diag["walk_no_walk_miou"] is not None
    assert any((Path(cfg.run_dir) / "demo" / "overlays" / "refinement").glob("*.png"))
    assert 0.0 <= results["baseline_miou"] <= 100.0 and 0.0 <= results["clims_miou"] <= 100.0
    # The numbers come from the evaluation stages' files.
    cams_json = json.loads((Path(cfg.run_dir) / "eval_clims" / "metrics" / "cams.json").read_text())
    assert results["clims_miou"] == pytest.approx(100 * cams_json["best_miou"])
    assert (Path(cfg.run_dir) / "demo" / "demo_table.md").read_text().count("|") > 10
    assert any((Path(cfg.run_dir) / "demo" / "overlays" / "clims").glob("*.png"))
    assert (Path(cfg.run_dir) / "demo" / "demo.png").is_file()
    assert all(
        (Path(cfg.run_dir) / "report" / f).is_file() for f in ("cam_sweep.png", "class_iou.png", "wall_times.png")
    )
    report = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert f"| CLIMS CAM mIoU (toy train), best threshold | {results['clims_miou']:.1f} |" in report
    # Rerunning skips every stage.
    again = run(cfg)
    assert {k: v["wall_s"] for k, v in again.items()} == {k: v["wall_s"] for k, v in manifests.items()}
