"""Stage E, IR labels (docs/reference.md#stage-e-ir-labels): confident seeds for IRN from CAMs + dense CRF.

Two CRF-refined argmax maps per image: a strict one (background plane 0.30) gives the foreground classes, a
lenient one (background plane 0.10) gives the background; every pixel neither map is sure about is 255.
CPU-bound (two CRFs per image), so images are spread over ``num_workers`` processes. The stage is resumable:
an existing PNG (written atomically) means that image is done. After writing, the labels of the evaluation split
are scored against ground truth (``metrics/ir_labels.json`` + ``.md``, see ``clims_pl.refine.diagnostics``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from clims_pl.refine.crf import crf_inference_label

log = logging.getLogger("clims_pl")


def class_lookup(keys: np.ndarray) -> np.ndarray:
    """[0, keys + 1]: maps compact plane indices (0 = background) to dataset labels 0..C."""
    return np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])


def confident_map(
    image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, bg_threshold: float, crf: dict[str, Any]
) -> np.ndarray:
    """Argmax over [constant background plane, CAMs], refined by the dense CRF, as dataset labels 0..C."""
    planes = np.concatenate([np.full((1, *high_res.shape[1:]), bg_threshold, high_res.dtype), high_res])
    compact = crf_inference_label(image, planes.argmax(axis=0), n_labels=len(planes), **crf)
    return class_lookup(keys)[compact]


def combine_ir_label(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """Reference combination: fg classes from the strict map; 0 only where both maps say background; else 255."""
    label = fg_conf.astype(np.uint8)
    label[fg_conf == 0] = 255
    label[(fg_conf == 0) & (bg_conf == 0)] = 0
    return label


def ir_label(
    image: np.ndarray,
    high_res: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.10,
    crf: dict[str, Any] | None = None,
) -> np.ndarray:
    """(H, W) uint8 IR label with values in {0..C, 255}.

    An image without classes (K = 0, never on VOC) is all background, as the reference's COCO branch does.
    """
    if image.shape[:2] != high_res.shape[1:]:
        raise ValueError(f"image {image.shape[:2]} and high_res {high_res.shape[1:]} sizes differ")
    if len(keys) == 0:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    crf = crf or {}
    fg_conf = confident_map(image, high_res, keys, fg_threshold, crf)
    bg_conf = confident_map(image, high_res, keys, bg_threshold, crf)
    return combine_ir_label(fg_conf, bg_conf)
