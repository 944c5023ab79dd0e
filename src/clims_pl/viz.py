"""CAM overlays for eyeballing a run: image | ground truth | CAM heat map per kept class | prediction.

One PNG per image (``<run_dir>/overlays/<id>.png``) built with PIL (no figure state, exact pixel sizes) and
matplotlib's colour maps; label maps use the VOC palette. With ``viz.refinement.diag_dir`` (a pseudo-label
stage's diagnostics folder) the panels show the refinement instead: image | CAM (max over classes) | IR label |
IRN edge map | walked map | pseudo label | ground truth; the stride-4 maps come from the ``<id>.npz`` files the
pseudo stage stored for its evaluation images (not recomputed: viz needs no IRN checkpoint). With a WandbLogger
configured the panels are also logged as wandb images. The reference drew a blended heat map for every image
during inference (docs/reference.md#q18-inference-outputs); here it is a separate, opt-in stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clims_pl.cams import load_cam
from clims_pl.data.imageio import read_label_png
from clims_pl.io import atomic_path
from clims_pl.metrics import cam_prediction

log = logging.getLogger(__name__)

TITLE_HEIGHT = 18
GAP = 4


def colorize_label(label: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 VOC palette colours (255 = ignore, cream)."""
    from clims_pl.data.imageio import VOC_PALETTE

    return VOC_PALETTE[np.asarray(label, dtype=np.uint8)]


def heat_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 image blended with ``cmap`` of a (H, W) map in [0, 1]: (1−alpha)·image + alpha·heat."""
    heat = matplotlib.colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    return ((1.0 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def _tile(array: np.ndarray, size: tuple[int, int], nearest: bool) -> Image.Image:
    """An RGB tile resized to ``size`` (w, h); label colours use nearest so no new colours appear."""
    img = Image.fromarray(array)
    return img.resize(size, Image.NEAREST if nearest else Image.BILINEAR) if img.size != size else img


def overlay_panel(
    image: np.ndarray,
    gt: np.ndarray | None,
    high_res: np.ndarray,
    keys: np.ndarray,
    names: Sequence[str],
    threshold: float = 0.15,
    alpha: float = 0.5,
    cmap: str = "jet",
    max_side: int | None = None,
) -> Image.Image:
    """One row of titled tiles: image | ground truth | CAM per class in ``keys`` | prediction at ``threshold``.

    ``names`` has C+1 entries, background first; ``gt`` None draws a grey "no ground truth" tile. Each tile is
    the image shrunk so its long side is at most ``max_side``, so the panel is
    (3+K)·w + (2+K)·GAP wide and h + TITLE_HEIGHT tall.
    """
    height, width = image.shape[:2]
    if high_res.shape[1:] != (height, width):
        raise ValueError(f"CAM maps {high_res.shape[1:]} do not match the image {(height, width)}")
    size = _tile_size(height, width, max_side)
    prediction = cam_prediction(high_res, keys, threshold)
    tiles = [("image", _tile(image, size, nearest=False)), _gt_tile(gt, size)]
    for k, cam in zip(keys, high_res, strict=True):
        tiles.append((f"CAM {names[int(k) + 1]}", _tile(heat_overlay(image, cam, alpha, cmap), size, False)))
    tiles.append((f"prediction @ {threshold:.2f}", _tile(colorize_label(prediction), size, nearest=True)))
    return _assemble(tiles, size)


def _tile_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) of a tile: the image shrunk so that its long side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    return max(1, round(width * scale)), max(1, round(height * scale))


def _gt_tile(gt: np.ndarray | None, size: tuple[int, int]) -> tuple[str, Image.Image]:
    if gt is None:
        return "no ground truth", Image.new("RGB", size, (128, 128, 128))
    return "ground truth", _tile(colorize_label(gt), size, nearest=True)


def _assemble(tiles: list[tuple[str, Image.Image]], size: tuple[int, int]) -> Image.Image:
    """Tiles side by side, GAP apart, each under its title."""
    panel = Image.new("RGB", (len(tiles) * size[0] + (len(tiles) - 1) * GAP, size[1] + TITLE_HEIGHT), "white")
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default(size=12)
    for i, (title, tile) in enumerate(tiles):
        x = i * (size[0] + GAP)
        panel.paste(tile, (x, TITLE_HEIGHT))
        draw.text((x + 2, 2), title, fill="black", font=font)
    return panel


def grid_to_image(grid: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A (…, h, w) map at image size: each cell a block of ceil(H / h) pixels (4 for the stride-4 grid, 2 with
    ``pseudo.scale=2``), so the grid stays visible; cropped to (H, W)."""
    cell = -(-image_size[0] // grid.shape[-2])
    return np.repeat(np.repeat(grid, cell, axis=-2), cell, axis=-1)[..., : image_size[0], : image_size[1]]


def refinement_panel(
    image: np.ndarray,
    gt: np.ndarray | None,
    high_res: np.ndarray,
    ir_label: np.ndarray,
    edge: np.ndarray,
    walked: np.ndarray,
    pseudo: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
    max_side: int | None = None,
) -> Image.Image:
    """image | CAM (max over classes) | IR label | edge map | walked map | pseudo label | ground truth.

    ``edge`` (h, w) and ``walked`` (K, h, w) are on the boundary map's grid (stride 4); the walked map is the max over classes divided
    by the global max (what the pseudo label thresholds); the edge map is grey, white = boundary (1).
    """
    height, width = image.shape[:2]
    if high_res.shape[1:] != (height, width) or ir_label.shape != (height, width) or pseudo.shape != (height, width):
        raise ValueError(
            f"CAM {high_res.shape[1:]}, IR label {ir_label.shape} and pseudo label {pseudo.shape} must match the "
            f"image {(height, width)}"
        )
    size = _tile_size(height, width, max_side)
    cam = high_res.max(axis=0) if len(high_res) else np.zeros((height, width))
    walk = walked.max(axis=0) if len(walked) else np.zeros(edge.shape)
    walk = walk / walk.max() if walk.max() > 0 else walk
    tiles = [
        ("image", _tile(image, size, nearest=False)),
        ("CAM (max)", _tile(heat_overlay(image, cam, alpha, cmap), size, nearest=False)),
        ("IR label", _tile(colorize_label(ir_label), size, nearest=True)),
        ("IRN edge", _tile(heat_overlay(image, grid_to_image(edge, (height, width)), 1.0, "gray"), size, True)),
        ("walked", _tile(heat_overlay(image, grid_to_image(walk, (height, width)), alpha, cmap), size, True)),
        ("pseudo label", _tile(colorize_label(pseudo), size, nearest=True)),
        _gt_tile(gt, size),
    ]
    return _assemble(tiles, size)


def _ground_truth_or_none(gt_root: str | os.PathLike, image_id: str) -> np.ndarray | None:
    """VOC mask when the id has one (train/val), else None (train_aug-only ids)."""
    from clims_pl.data.voc import load_mask

    path = Path(gt_root) / "SegmentationClass" / f"{image_id}.png"
    return load_mask(gt_root, image_id) if path.is_file() else None


def pick_ids(
    cam_dir: str | os.PathLike,
    ids: Sequence[str] | None,
    n: int,
    seed: int = 0,
    what: str = "CAM",
    fix: str = "run clims-infer on them",
) -> list[str]:
    """The given ids (each must have a ``<cam_dir>/<id>.npz``), or ``n`` of them drawn without replacement (seeded),
    sorted. ``what`` / ``fix`` name the files and the remedy in the error messages."""
    cam_dir = Path(cam_dir)
    available = sorted(p.stem for p in cam_dir.glob("*.npz"))
    if ids:
        if not all(isinstance(i, str) for i in ids):
            raise ValueError(
                f"viz.ids={list(ids)}: quote the ids, e.g. 'viz.ids=[\"2007_000032\"]' "
                "(Hydra reads 2007_000032 as the integer 2007000032)"
            )
        missing = [i for i in ids if not (cam_dir / f"{i}.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"{cam_dir}: no {what} file for viz.ids {missing}; {fix}")
        return list(ids)
    if not available:
        raise FileNotFoundError(f"{cam_dir}: no {what} files; {fix}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(available, size=min(n, len(available)), replace=False).tolist())


def render_overlay(
    cam_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    image_id: str,
    names: Sequence[str],
    **panel_kwargs: Any,
) -> Image.Image:
    """The overlay panel of one id from its CAM file, its image and (when it has one) its VOC mask."""
    from clims_pl.data.voc import load_image

    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    image, gt = load_image(image_root, image_id), _ground_truth_or_none(image_root, image_id)
    return overlay_panel(image, gt, cams["high_res"], cams["keys"], names, **panel_kwargs)


def render_refinement(
    dirs: dict[str, str | os.PathLike], image_root: str | os.PathLike, image_id: str, **panel_kwargs: Any
) -> Image.Image:
    """The refinement panel of one id; ``dirs`` = {cams, ir_labels, pseudo, diag} folders (diag: the pseudo stage's
    ``pseudo.diag_dir``)."""
    from clims_pl.data.voc import load_image
    from clims_pl.refine.diagnostics import load_diag

    diag = load_diag(Path(dirs["diag"]) / f"{image_id}.npz")
    return refinement_panel(
        load_image(image_root, image_id),
        _ground_truth_or_none(image_root, image_id),
        load_cam(Path(dirs["cams"]) / f"{image_id}.npz")["high_res"],
        read_label_png(Path(dirs["ir_labels"]) / f"{image_id}.png"),
        diag["edge"].astype(np.float32),
        diag["walked"].astype(np.float32),
        read_label_png(Path(dirs["pseudo"]) / f"{image_id}.png"),
        **panel_kwargs,
    )


def render_labels(
    label_dirs: Mapping[str, str | os.PathLike],
    image_root: str | os.PathLike,
    image_id: str,
    max_side: int | None = 320,
) -> Image.Image:
    """image | the label PNG of each folder of ``label_dirs`` (title → folder, in order) | ground truth, for one id
    (DeepLab's val panels: prediction and CRF prediction side by side)."""
    from clims_pl.data.voc import load_image

    image = load_image(image_root, image_id)
    size = _tile_size(*image.shape[:2], max_side)
    tiles = [("image", _tile(image, size, nearest=False))]
    for title, label_dir in label_dirs.items():
        label = colorize_label(read_label_png(Path(label_dir) / f"{image_id}.png"))
        tiles.append((title, _tile(label, size, nearest=True)))
    return _assemble([*tiles, _gt_tile(_ground_truth_or_none(image_root, image_id), size)], size)


def save_panels(ids: Sequence[str], out_dir: str | os.PathLike, render: Callable[[str], Image.Image]) -> list[Path]:
    """``<out_dir>/<id>.png`` = ``render(id)`` for each id, written atomically; returns the paths."""
    paths = []
    for image_id in ids:
        path = Path(out_dir) / f"{image_id}.png"
        with atomic_path(path) as tmp:
            render(image_id).save(tmp, format="PNG")
        paths.append(path)
    return paths


def write_overlays(
    cam_dir: str | os.PathLike,
    image_root: str | os.PathLike,
    ids: Sequence[str],
    out_dir: str | os.PathLike,
    names: Sequence[str],
    **panel_kwargs: Any,
) -> list[Path]:
    """``<out_dir>/<id>.png`` overlay panels (see ``overlay_panel`` for the keyword arguments); returns the paths."""
    return save_panels(ids, out_dir, lambda i: render_overlay(cam_dir, image_root, i, names, **panel_kwargs))


def write_refinement_overlays(
    dirs: dict[str, str | os.PathLike],
    image_root: str | os.PathLike,
    ids: Sequence[str],
    out_dir: str | os.PathLike,
    **panel_kwargs: Any,
) -> list[Path]:
    """``<out_dir>/<id>.png`` refinement panels (see ``render_refinement``, ``refinement_panel``)."""
    return save_panels(ids, out_dir, lambda i: render_refinement(dirs, image_root, i, **panel_kwargs))
