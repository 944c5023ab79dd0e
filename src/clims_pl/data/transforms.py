"""Image transforms of the reference (docs/reference.md#normalisation-and-augmentation) as albumentations 2.x pipelines, plus the inference normalisation.

Training: random long side in [lo, hi] (PIL bicubic, as the reference's ``pil_rescale``) → ImageNet
normalisation → horizontal flip (p = 0.5) → random S × S crop; an axis shorter than S is placed at a random
offset and padded with 0 in normalised space (the ImageNet mean colour) and 255 in masks. Validation: the
top-left S × S crop with the same padding. Masks (``mask=`` or any ``additional_targets`` of type mask) get
the same geometry with nearest-neighbour resizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Label value of padded (and otherwise ignored) mask pixels (docs/reference.md#ignore-label).
IGNORE_INDEX = 255


def imagenet_normalize(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → float32 ``(x/255 − mean)/std``, computed in float64 like the reference."""
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    return ((img / 255.0 - mean) / std).astype(np.float32)


def pil_resize(arr: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize an (H, W[, C]) array to ``size`` = (h, w) with PIL; a no-op when the size already matches.

    PIL (not OpenCV) because its bicubic filter antialiases when shrinking, which is what the reference does.
    Multi-channel float arrays are resized channel by channel (PIL has no multi-channel float mode).
    """
    if arr.shape[:2] == tuple(size):
        return arr
    if arr.ndim == 3 and arr.dtype != np.uint8:
        return np.stack([pil_resize(arr[..., c], size, resample) for c in range(arr.shape[2])], axis=-1)
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), resample))


class RandomResizeLong(A.DualTransform):
    """Rescale so that the long side is an integer drawn uniformly from [lo, hi] (reference random_resize_long).

    Target size = (round(h·s), round(w·s)) with s = L / max(h, w); images bicubic, masks nearest.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        lo: int
        hi: int

    def __init__(self, lo: int, hi: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 0 < lo <= hi:
            raise ValueError(f"resize_long must be [lo, hi] with 0 < lo <= hi, got [{lo}, {hi}]")
        self.lo, self.hi = lo, hi

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        scale = self.py_random.randint(self.lo, self.hi) / max(h, w)
        return {"size": (round(h * scale), round(w * scale))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return pil_resize(img, size, Image.Resampling.BICUBIC)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return pil_resize(mask, size, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("lo", "hi")


def _normalize() -> A.Normalize:
    return A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)


def train_transform(
    crop_size: int,
    resize_long: Sequence[int] | None,
    *,
    hflip: bool = True,
    additional_targets: dict[str, str] | None = None,
) -> A.Compose:
    """Reference training augmentation (docs/reference.md#normalisation-and-augmentation, docs/reference.md#stage-a-baseline-cam); ``resize_long=None`` skips the random rescale.

    Returns a Compose producing ``image`` as a (3, S, S) float tensor (and ``mask`` as an (S, S) tensor).
    ``strict=True`` turns albumentations-1.x argument names (``value=``, ``mask_value=``) into errors
    instead of silently padding masks with 0.
    """
    steps: list[A.BasicTransform] = []
    if resize_long is not None:
        lo, hi = (int(v) for v in resize_long)
        steps.append(RandomResizeLong(lo, hi))
    steps.append(_normalize())
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(
        A.RandomCrop(
            crop_size,
            crop_size,
            pad_if_needed=True,
            pad_position="random",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        )
    )
    steps.append(ToTensorV2())
    return A.Compose(steps, additional_targets=additional_targets, strict=True)


def val_transform(crop_size: int, *, additional_targets: dict[str, str] | None = None) -> A.Compose:
    """Deterministic top-left S × S crop, padded bottom/right with 0 (image) and 255 (mask) (docs/reference.md#stage-a-baseline-cam validation)."""
    steps = [
        _normalize(),
        A.PadIfNeeded(
            crop_size,
            crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.Crop(0, 0, crop_size, crop_size),
        ToTensorV2(),
    ]
    return A.Compose(steps, additional_targets=additional_targets, strict=True)
