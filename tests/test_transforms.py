"""Reference augmentation (docs/reference.md#normalisation-and-augmentation): image and mask stay aligned, padding values, resize-long range, val crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clims_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_normalize,
    train_transform,
    val_transform,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _tiles(h: int, w: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask of random labels 0..20 in tile × tile blocks and an image whose pixels are 10 × label."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 21, (h // tile + 1, w // tile + 1))
    mask = np.kron(blocks, np.ones((tile, tile), dtype=np.int64))[:h, :w].astype(np.uint8)
    image = np.repeat((mask * 10)[..., None], 3, axis=2).astype(np.uint8)
    return image, mask


def _interior(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood carries one label (away from block edges, where bicubic blends)."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.int32), r, constant_values=-1)
    same = np.ones((h, w), dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            same &= padded[r + dy : r + dy + h, r + dx : r + dx + w] == mask
    return same


def _misaligned(image: torch.Tensor, mask: torch.Tensor) -> int:
    """Number of interior labelled pixels whose (de-normalised) value is not 10 × their mask label."""
    pixels = (image * STD + MEAN)[0].numpy() * 255
    m = mask.numpy()
    check = _interior(m, 3) & (m != 255)
    assert check.sum() > 100
    return int((np.abs(pixels[check] - 10.0 * m[check]) > 3).sum())


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    image, mask = _tiles(90, 70, 16, seed=0)
    transform = train_transform(64, (60, 120))
    widths = set()
    for seed in range(24):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and m.shape == (64, 64)
        assert _misaligned(img, m) == 0
        # A drifted mask (flipped alone) would be caught by the same check.
        assert _misaligned(img, m.flip(-1)) > 50
        pad = m == 255
        assert (img[:, pad] == 0).all()  # padding is 0 in normalised space (the ImageNet mean colour)
        widths.add(int((~pad).any(0).sum()))
    assert len(widths) > 5  # random long sides were drawn


def test_resize_long_range_and_random_placement() -> None:
    image, mask = _tiles(50, 100, 10, seed=1)
    transform = train_transform(200, (40, 60))  # crop larger than any resized image: all of it is kept
    offsets = set()
    for seed in range(30):
        transform.set_random_seed(seed)
        m = transform(image=image, mask=mask)["mask"].numpy()
        rows, cols = np.nonzero(m != 255)
        long_side, short_side = np.ptp(cols) + 1, np.ptp(rows) + 1
        assert 40 <= long_side <= 60 and short_side == round(50 * long_side / 100)
        offsets.add((rows.min(), cols.min()))
        assert rows.max() < 200 and cols.max() < 200
    assert len(offsets) > 20  # placed at a random offset, not centred or top-left


def test_no_resize_keeps_pixels_exactly() -> None:
    image, mask = _tiles(30, 20, 5, seed=2)
    out = train_transform(32, None, hflip=False)(image=image, mask=mask)
    m = out["mask"].numpy()
    rows, cols = np.nonzero(m != 255)
    top, left = rows.min(), cols.min()
    np.testing.assert_array_equal(m[top : top + 30, left : left + 20], mask)
    expected = torch.from_numpy(imagenet_normalize(image)).permute(2, 0, 1)
    torch.testing.assert_close(out["image"][:, top : top + 30, left : left + 20], expected, atol=1e-5, rtol=0)


def test_val_transform_is_top_left_and_deterministic() -> None:
    image, mask = _tiles(40, 70, 7, seed=3)
    transform = val_transform(48)
    a, b = transform(image=image, mask=mask), transform(image=image, mask=mask)
    torch.testing.assert_close(a["image"], b["image"])
    expected = torch.from_numpy(imagenet_normalize(image)).permute(2, 0, 1)
    torch.testing.assert_close(a["image"][:, :40, :48], expected[:, :, :48], atol=1e-5, rtol=0)
    assert (a["image"][:, 40:, :] == 0).all()
    np.testing.assert_array_equal(a["mask"].numpy()[:40], mask[:, :48])
    assert (a["mask"].numpy()[40:] == 255).all()


def test_imagenet_normalize_reference_values() -> None:
    x = imagenet_normalize(np.array([[[0, 128, 255]]], np.uint8))
    expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)
    assert x.dtype == np.float32


def test_resize_long_rejects_bad_range() -> None:
    with pytest.raises(ValueError, match="resize_long"):
        train_transform(64, (80, 40))
