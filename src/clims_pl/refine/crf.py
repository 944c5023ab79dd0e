"""Dense CRF (pydensecrf) in the two flavours the reference uses.

* :func:`crf_inference_label` — IR labels (docs/reference.md#stage-e-ir-labels): unary from *hard* labels (gt_prob 0.7), Gaussian 3/3,
  bilateral 50/5/10, 10 iterations, on the RGB uint8 image; returns the argmax label.
* :func:`crf_inference_prob` — DeepLab post-processing (docs/reference.md#deeplab-test-and-crf): unary −log(softmax), Gaussian 1/3,
  bilateral 67/3/4, 10 iterations; returns the refined probabilities.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax


def _dense_crf(
    image: np.ndarray,
    unary: np.ndarray,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> np.ndarray:
    """Mean-field inference; returns Q as (n_labels, H, W) float32."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense CRF needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    n_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.array(image, order="C"), compat=bilateral_compat
    )
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n_labels, height, width)


def crf_inference_label(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    gt_prob: float = 0.7,
    iterations: int = 10,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 10,
) -> np.ndarray:
    """Refine hard labels 0..n_labels−1 (every label 'sure', zero_unsure=False); returns the (H, W) argmax."""
    if n_labels < 2:
        raise ValueError("crf_inference_label needs at least 2 labels (background + one class)")
    unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _dense_crf(
        image, unary, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat
    )
    return q.argmax(axis=0)


def crf_inference_prob(
    image: np.ndarray,
    prob: np.ndarray,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 1,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 67,
    bilateral_srgb: float = 3,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """Refine (C, H, W) softmax probabilities with unary −log(p) (clipped at 1e-5); returns Q (C, H, W)."""
    unary = unary_from_softmax(prob)
    return _dense_crf(
        image, unary, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat
    )
