"""Tiny on-disk inputs for the CAM evaluation/visualisation tests: a VOC-layout root and matching CAM files."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clims_pl.cams import strided_size
from clims_pl.data.imageio import save_label_png
from clims_pl.data.voc import VOC_CLASSES
from clims_pl.io import atomic_save_npz


def write_voc_root(
    root: Path,
    shapes: dict[str, tuple[int, int]],
    seed: int = 0,
    classes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """JPEGImages, Annotations, SegmentationClass (with 255 borders) and a ``train`` split; returns the masks.

    Each mask has one or two object rectangles on background (the 1-based ``classes`` of the id if given, else
    random ones), so images keep 1–2 classes.
    """
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    masks = {}
    for image_id, (h, w) in shapes.items():
        mask = np.zeros((h, w), dtype=np.uint8)
        # Drawn even when ``classes`` is given, so the generator's stream (the other tests' data) stays the same.
        drawn = rng.choice(20, size=int(rng.integers(1, 3)), replace=False) + 1
        present = drawn if classes is None else np.asarray(classes[image_id])
        for i, c in enumerate(present):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[y0 : y0 + h // 2 + i, x0 : x0 + w // 2] = c
        mask[0, :] = 255
        masks[image_id] = mask
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        image = (rng.random((h, w, 3)) * 80 + mask[..., None] * 8).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
        objects = "".join(f"<object><name>{VOC_CLASSES[c - 1]}</name></object>" for c in present)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in shapes))
    (root / "ImageSets/Segmentation/val.txt").write_text("")
    return masks


def write_voc_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> None:
    """A VOC2012 + SBD-shaped root: train and val images of 64-96 px whose two objects each cycle through all 20
    classes, SegmentationClassAug (= SegmentationClass) for every id, and the train/val lists."""
    rng = np.random.default_rng(seed)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    shapes = {image_id: (int(rng.integers(64, 97)), int(rng.integers(64, 97))) for image_id in ids}
    classes = {image_id: [2 * k % 20 + 1, (2 * k + 1) % 20 + 1] for k, image_id in enumerate(ids)}
    write_voc_root(root, shapes, seed, classes)
    (root / "SegmentationClassAug").mkdir()
    for image_id in ids:
        shutil.copy(root / "SegmentationClass" / f"{image_id}.png", root / "SegmentationClassAug" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))


def write_cam_files(cam_dir: Path, masks: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``<id>.npz`` per mask: keys = the mask's classes, high_res = noisy indicator of each class, max 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for image_id, mask in masks.items():
        keys = np.array(sorted(int(c) - 1 for c in np.unique(mask) if 0 < c < 255), dtype=np.int64)
        high_res = np.stack([0.6 * (mask == k + 1) + 0.4 * rng.random(mask.shape) for k in keys]).astype(np.float32)
        high_res /= high_res.max(axis=(1, 2), keepdims=True)
        h4, w4 = strided_size(mask.shape)
        cam = np.ascontiguousarray(high_res[:, ::4, ::4][:, :h4, :w4])
        atomic_save_npz(cam_dir / f"{image_id}.npz", keys=keys, cam=cam, high_res=high_res)
        out[image_id] = {"keys": keys, "cam": cam, "high_res": high_res}
    return out
