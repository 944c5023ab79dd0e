"""IR labels (docs/reference.md#stage-e-ir-labels): the combination rule, CRF outputs, and the parallel, resumable stage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cam_fixtures import write_cam_files, write_voc_root
from omegaconf import open_dict
from PIL import Image

from clims_pl.data.imageio import VOC_PALETTE
from clims_pl.provenance import ProvenanceError
from clims_pl.refine.crf import crf_inference_label, crf_inference_prob
from clims_pl.refine.ir_labels import combine_ir_label, ir_label
from clims_pl.stages import ir_labels


def test_combination_rule_by_hand() -> None:
    fg_conf = np.array([[0, 3, 0, 0], [5, 0, 0, 3]])
    bg_conf = np.array([[0, 3, 2, 0], [0, 5, 0, 0]])
    # fg class wherever the strict map has one; 0 only where both say background; otherwise unsure (255)
    expected = np.array([[0, 3, 255, 0], [5, 255, 0, 3]], dtype=np.uint8)
    assert np.array_equal(combine_ir_label(fg_conf, bg_conf), expected)


def _two_region_image() -> tuple[np.ndarray, np.ndarray]:
    """A 24×32 image: dark left half, bright right half; returns image and the right-half mask."""
    image = np.full((24, 32, 3), 30, dtype=np.uint8)
    image[:, 16:] = 220
    right = np.zeros((24, 32), dtype=bool)
    right[:, 16:] = True
    return image, right


def test_crf_label_follows_colour_edges() -> None:
    image, right = _two_region_image()
    labels = right.astype(np.int64)
    labels[:, 12:16] = 1  # a sloppy seed spilling 4 columns over the colour edge
    out = crf_inference_label(image, labels, n_labels=2)
    assert set(np.unique(out).tolist()) <= {0, 1}
    assert np.array_equal(out == 1, right)  # the bilateral term snaps the label to the colour edge


def test_crf_prob_is_a_distribution() -> None:
    image, right = _two_region_image()
    prob = np.stack([np.where(right, 0.3, 0.7), np.where(right, 0.7, 0.3)]).astype(np.float32)
    q = crf_inference_prob(image, prob)
    assert q.shape == (2, 24, 32)
    assert np.allclose(q.sum(axis=0), 1.0, atol=1e-4)
    assert np.array_equal(q.argmax(axis=0) == 1, right)


def test_ir_label_values_and_unsure_band() -> None:
    image, right = _two_region_image()
    image[:, 10:16] = 120  # a third colour region with a weak activation
    cam = np.where(right, 0.9, 0.0).astype(np.float32)
    cam[:, 10:16] = 0.2  # below the strict 0.30 plane (background there), above the lenient 0.10 (class there)
    label = ir_label(image, cam[None], np.array([6]))
    assert set(np.unique(label).tolist()) <= {0, 7, 255}
    assert np.all(label[right] == 7)
    assert np.all(label[:, :10] == 0)
    assert np.all(label[:, 10:16] == 255)  # the maps disagree: unsure
    # an image without classes (K = 0) is all background
    assert np.all(ir_label(image, np.zeros((0, 24, 32), np.float32), np.zeros(0, np.int64)) == 0)


def test_ir_label_rejects_size_mismatch() -> None:
    image, _ = _two_region_image()
    with pytest.raises(ValueError, match="sizes differ"):
        ir_label(image, np.zeros((1, 20, 32), np.float32), np.array([0]))


def test_stage_parallel_resumable(tmp_path: Path, compose_cfg) -> None:
    shapes = {"a": (30, 41), "b": (36, 28), "c": (25, 25)}
    masks = write_voc_root(tmp_path / "voc", shapes)
    cams = write_cam_files(tmp_path / "cams", masks)
    cfg = compose_cfg(
        "refine",
        [
            f"data.root={tmp_path / 'voc'}",
            f"ir_labels.cam_dir={tmp_path / 'cams'}",
            "ir_labels.split=train",
            "ir_labels.num_workers=2",
        ],
    )
    stats = ir_labels.run(cfg)
    assert stats["written"] == 3 and stats["skipped"] == 0
    out = Path(cfg.ir_labels.out_dir)
    for image_id, mask in masks.items():
        with Image.open(out / f"{image_id}.png") as img:
            assert img.mode == "P"
            assert np.array_equal(np.asarray(img.getpalette()[: 3 * 256]).reshape(256, 3), VOC_PALETTE)
            label = np.asarray(img)
        assert label.shape == mask.shape
        allowed = {0, 255} | {int(k) + 1 for k in cams[image_id]["keys"]}
        assert set(np.unique(label).tolist()) <= allowed
    assert not list(out.glob(".*.tmp"))
    # diagnostics on the evaluation split (train here): shares add up, precision within [0, 1], markdown beside
    diag = json.loads(Path(cfg.ir_labels.metrics_path).read_text())
    assert diag["num_images"] == 3 and sum(diag["fraction"].values()) == pytest.approx(1.0)
    assert 0.0 <= diag["fg_precision"] <= 1.0 and stats["fg_precision"] == diag["fg_precision"]
    assert Path(cfg.ir_labels.metrics_path).with_suffix(".md").is_file()
    (out / "b.png").unlink()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    (out / f".b.png.clims-{socket.gethostname()}-{killed.pid}.0a1b2c3d.tmp").write_bytes(b"half")  # a killed run's
    again = ir_labels.run(cfg)
    assert again["written"] == 1 and again["skipped"] == 2
    assert not list(out.glob(".*.tmp"))
    # CAMs recomputed (say, from another checkpoint): labels of the old ones are refused, never mixed with new.
    write_cam_files(tmp_path / "cams", masks, seed=1)
    with pytest.raises(ProvenanceError, match=r"ir_labels holds IR labels made from other cams; pass overwrite=true"):
        ir_labels.run(cfg)
    with open_dict(cfg):
        cfg.overwrite = True
    assert ir_labels.run(cfg)["written"] == 3
