"""Report: numbers come from manifests, deltas against the reference file, markdown + CSV written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clims_pl.stages.report import run


def test_report_reads_manifests(tmp_path: Path, compose_cfg) -> None:
    run_dir = tmp_path / "pipe"
    for stage, metrics, wall in [
        ("eval_clims", {"miou": {"best": 0.6025}, "best_threshold": 0.17}, 3.0),
        ("pseudo", {}, 1.0),
    ]:
        (run_dir / stage).mkdir(parents=True)
        manifest = {"stage": stage, "finished": True, "wall_s": wall, "config_hash": "abc", "metrics": metrics}
        (run_dir / stage / "manifest.json").write_text(json.dumps(manifest))
    cfg = compose_cfg(
        "report",
        [
            f"report.run_dir={run_dir}",
            "+report.rows=[{stage: eval_clims, key: miou.best, ref: cam_train, threshold_key: best_threshold},"
            "{stage: pseudo, key: miou, ref: pseudo_train}]",
        ],
    )
    result = run(cfg)
    assert result["miou.best"] == pytest.approx(60.25)
    out = Path(cfg.paths.output_dir)
    md = (out / "report.md").read_text()
    assert "| CAM mIoU (VOC train) | 60.2 | 56.6 | 58.6 | 1.6 | 0.17 | eval_clims |" in md
    assert "| eval_clims | 3.0 | `abc` |" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert float(rows[0]["delta_vs_repo"]) == pytest.approx(60.25 - 58.6)
    assert rows[1]["ours"] == "nan"  # the pseudo stage reported no mIoU: shown as missing, never invented
