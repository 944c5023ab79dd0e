"""Image and label-PNG file I/O shared by every dataset layout (VOC, COCO, the toy world).

Every loader opens files through :func:`decode_image`, so a missing or corrupt file is reported with its image id
and path; label maps are written as VOC palette PNGs, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from clims_pl.io import atomic_path


def _voc_palette() -> np.ndarray:
    """The standard VOC colour map: class k's RGB bits come from the bits of k, spread over 8 levels."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for k in range(256):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


#: (256, 3) uint8 VOC colour map; index 255 (ignore) is (224, 224, 192).
VOC_PALETTE: np.ndarray = _voc_palette()


class ImageFileError(OSError):
    """An image or mask file that cannot be decoded; the message names the image id and the path."""


def decode_image(path: str | os.PathLike, image_id: str, *, index: bool = False) -> np.ndarray:
    """Open and fully decode one file: (H, W, 3) uint8 RGB, or with ``index`` the (H, W) uint8 values of a palette
    or grey-level PNG. Every loader reads through here so that a missing or corrupt file (PIL's "image file is
    truncated" names neither) is reported with the image id and the path.
    """
    path = Path(path)
    hint = "re-extract the dataset or remove the id from the split; `clims-data check --deep` lists every bad file"
    try:
        with Image.open(path) as img:
            if index and img.mode not in ("P", "L"):
                raise ImageFileError(
                    f"image {image_id}: {path} is mode {img.mode}: expected a palette or grey-level index PNG"
                )
            return np.asarray(img, dtype=np.uint8).copy() if index else np.asarray(img.convert("RGB"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {image_id}: {path} not found; {hint}") from err
    except ImageFileError:
        raise
    except (OSError, SyntaxError, EOFError, ValueError) as err:  # what PIL raises for corrupt or truncated data
        raise ImageFileError(f"image {image_id}: cannot decode {path} ({err}); {hint}") from err


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write (H, W) uint8 indices as a VOC palette PNG, atomically (readers never see a partial file)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: label must be (H, W), got shape {label.shape}")
    img = Image.fromarray(label.astype(np.uint8))
    img.putpalette(VOC_PALETTE.reshape(-1).tolist())  # turns the grey image into a palette one
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 indices of a palette or grey-level label PNG, with a clear error when missing or RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label PNG missing; run the stage that writes this folder first")
    return decode_image(path, path.stem, index=True)
