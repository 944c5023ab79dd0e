"""IRN and DeepLab training augmentation (docs/reference.md#affinity-labels, docs/reference.md#deeplab-training):
hand-checked crop sizes, padding, resampling, joint flips and seeding of the albumentations pipelines."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cam_fixtures import write_voc_root
from PIL import Image

from clims_pl.data.affinity import AffinityDataModule
from clims_pl.data.segmentation import SegDataModule
from clims_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    pil_rescale,
    pil_resize,
    seed_transform,
    seg_train_transform,
    train_transform,
)

LABEL = {"label": "mask"}
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _scene(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label of random 0..20 blocks (8 px, so left-right asymmetric) without 255; image = 10 × label."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 21, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8), np.int64))[:h, :w]
    image = np.repeat((label * 10)[..., None], 3, axis=2).astype(np.uint8)
    return image, label.astype(np.uint8)


def _region(label: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the non-padding (≠ 255) pixels of a crop."""
    rows = np.nonzero((label != 255).any(1))[0]
    cols = np.nonzero((label != 255).any(0))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def test_irn_rescale_range_nearest_labels_random_offset_and_padding() -> None:
    image, label = _scene(40, 60)
    transform = train_transform(128, None, rescale=(0.5, 1.5), hflip=False, additional_targets=LABEL)
    sizes, offsets = set(), set()
    for seed in range(40):
        seed_transform(transform, seed)
        out = transform(image=image, label=label)
        img, lab = out["image"], out["label"].numpy()
        assert img.shape == (3, 128, 128) and lab.shape == (128, 128)
        rows, cols = _region(lab)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        scale = h / 40  # one factor for both axes, in [0.5, 1.5], sizes rounded as pil_rescale
        assert 0.5 * 40 - 1 <= h <= 1.5 * 40 and abs(w - 60 * scale) <= 1.5
        # Labels resampled with PIL nearest (no new values, exactly pil_resize), the image with PIL bicubic.
        np.testing.assert_array_equal(lab[rows, cols], pil_resize(label, (h, w), Image.Resampling.NEAREST))
        pixels = (img * STD + MEAN).numpy().transpose(1, 2, 0)[rows, cols] * 255
        np.testing.assert_allclose(pixels, pil_resize(image, (h, w), Image.Resampling.BICUBIC), atol=0.01)
        # Padding: 0 in normalised space (the ImageNet mean colour), 255 in the label.
        pad = np.ones((128, 128), bool)
        pad[rows, cols] = False
        assert (lab[pad] == 255).all() and (img[:, torch.from_numpy(pad)] == 0).all()
        sizes.add((h, w))
        offsets.add((rows.start, cols.start))
    assert len(sizes) > 20 and len(offsets) > 30  # random scales, random placement (not centred, not top-left)


def test_irn_crop_of_a_larger_image_and_stride4_label() -> None:
    image, label = _scene(100, 140)
    full = train_transform(64, None, rescale=(1.0, 1.0), additional_targets=LABEL)
    small = train_transform(64, None, rescale=(1.0, 1.0), mask_stride=4, additional_targets=LABEL)
    windows = set()
    for seed in range(20):
        seed_transform(full, seed)
        seed_transform(small, seed)
        a, b = full(image=image, label=label), small(image=image, label=label)
        assert b["image"].shape == (3, 64, 64) and b["label"].shape == (16, 16)
        torch.testing.assert_close(a["image"], b["image"])  # MaskStride leaves the image alone
        lab = a["label"].numpy()
        assert (lab != 255).all()  # a window of the larger image: no padding
        np.testing.assert_array_equal(b["label"].numpy(), pil_rescale(lab, 0.25, Image.Resampling.NEAREST))
        windows.add(tuple(lab[:, 32]))
    assert len(windows) > 10


def test_flip_moves_image_and_label_together() -> None:
    image, label = _scene(48, 48)
    for transform in (
        train_transform(48, None, rescale=(1.0, 1.0), additional_targets=LABEL),
        seg_train_transform(48, (1.0,), additional_targets=LABEL),
    ):
        flips = []
        for seed in range(16):
            seed_transform(transform, seed)
            out = transform(image=image, label=label)
            lab = out["label"].numpy()
            pixels = np.rint((out["image"] * STD + MEAN)[0].numpy() * 255)
            np.testing.assert_array_equal(pixels, lab * 10.0)  # the image still matches its label
            flipped = np.array_equal(lab, label[:, ::-1])
            assert flipped or np.array_equal(lab, label)
            flips.append(flipped)
        assert 3 <= sum(flips) <= 13  # p = 0.5


@pytest.mark.parametrize("mode", ["imagenet", "caffe_bgr"])
def test_deeplab_scale_choice_truncated_sizes_top_left_padding(mode: str) -> None:
    image, label = _scene(50, 70)
    scales = (0.5, 0.75, 1.25)
    transform = seg_train_transform(96, scales, hflip=False, normalization=mode, additional_targets=LABEL)
    seen = set()
    for seed in range(24):
        seed_transform(transform, seed)
        out = transform(image=image, label=label)
        img, lab = out["image"].numpy().transpose(1, 2, 0), out["label"].numpy()
        assert img.shape == (96, 96, 3) and lab.shape == (96, 96)
        rows, cols = _region(lab)
        (s,) = [s for s in scales if int(50 * s) == rows.stop]  # 25, 37 or 62 rows: all smaller than the crop
        h, w = int(50 * s), int(70 * s)  # truncated, as the reference
        seen.add(s)
        assert rows.start == 0 and cols.start == 0 and (rows.stop, cols.stop) == (h, w)  # top-left
        np.testing.assert_array_equal(lab[:h, :w], pil_resize(label, (h, w), Image.Resampling.NEAREST))
        expected = cv2.resize(normalize(image, mode), (w, h), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(img[:h, :w], expected, atol=1e-4)
        assert (lab[h:] == 255).all() and (lab[:, w:] == 255).all()
        assert (img[h:] == 0).all() and (img[:, w:] == 0).all()  # the mean colour in either normalisation
    assert seen == set(scales)


def test_seeded_steps_draw_from_one_stream() -> None:
    """Compose.set_random_seed gives every step the same sequence (albumentations 2.0.8): the drawn scale then sets
    where in its free range the image is placed (correlation 0.47 here). seed_transform shares one stream instead."""
    image, label = _scene(40, 60)
    transform = train_transform(128, None, rescale=(0.5, 1.5), hflip=False, additional_targets=LABEL)
    draws = []
    for seed in range(400):
        seed_transform(transform, seed)
        rows, cols = _region(transform(image=image, label=label)["label"].numpy())
        h, w = rows.stop - rows.start, cols.stop - cols.start
        draws.append((h, rows.start / (128 - h), cols.start / (128 - w)))  # offsets as a fraction of their range
    corr = np.corrcoef(np.array(draws).T)
    assert abs(corr[0, 1]) < 0.15 and abs(corr[0, 2]) < 0.15 and abs(corr[1, 2]) < 0.15


def _batches(module, seed: int) -> list[dict]:
    torch.manual_seed(seed)  # what seed_everything does for the loader's shuffle and the pipeline's seed
    return list(module.train_dataloader())


@pytest.mark.parametrize("kind", ["affinity", "seg"])
@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_other_seed_other_batches(tmp_path: Path, kind: str, workers: int) -> None:
    root = tmp_path / "voc"
    write_voc_root(root, {"a": (40, 70)})
    # One image listed 4 times: order plays no part, so any difference between crops is the pipeline's draw.
    (root / "ImageSets/Segmentation/rep.txt").write_text("a\n" * 4)
    common = dict(root=root, label_dir=root / "SegmentationClass", classes=["x"] * 20, train_split="rep")
    if kind == "affinity":
        module = AffinityDataModule(**common, batch_size=1, num_workers=workers, crop_size=32)
        label_size = 8
    else:
        module = SegDataModule(**common, val_split=None, batch_size=1, num_workers=workers, crop_size=32)
        label_size = 32
    first, again, other = _batches(module, 0), _batches(module, 0), _batches(module, 1)
    assert len(first) == 4 and first[0]["label"].shape == (1, label_size, label_size)
    assert first[0]["label"].dtype == torch.int64 and first[0]["image"].shape == (1, 3, 32, 32)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(first[0]["image"], other[0]["image"])  # the pipeline's seed follows torch's
    # Batches 0 and 1 come from different workers when workers=2: each worker has its own seed.
    assert not torch.equal(first[0]["image"], first[1]["image"])
