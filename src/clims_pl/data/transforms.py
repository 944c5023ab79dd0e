"""Image transforms of the reference (docs/reference.md#normalisation-and-augmentation) as albumentations 2.x pipelines, plus the inference normalisation.

CAM / CLIMS and IRN training (:func:`train_transform`): random long side in [lo, hi] or random rescale by a
factor in [lo, hi) (PIL bicubic, as the reference's ``pil_rescale``) → ImageNet normalisation → horizontal flip
(p = 0.5) → random S × S crop; an axis shorter than S is placed at a random offset and padded with 0 in
normalised space (the ImageNet mean colour) and 255 in masks; IRN's label is then reduced to the stride-4 grid.
DeepLab training (:func:`seg_train_transform`, the reference ``VOCAug``): normalise → one scale from a list
(OpenCV bilinear, size truncated) → pad bottom/right to S → random S × S crop → flip. Validation: the top-left
S × S crop with the same padding. Masks (``mask=`` or any ``additional_targets`` of type mask) get the same
geometry with PIL nearest-neighbour resizing. Every pipeline draws from albumentations' own generators:
:func:`seed_from_torch` and :func:`seed_worker_transform` seed them so that ``seed_everything`` repeats a run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import get_worker_info

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Label value of padded (and otherwise ignored) mask pixels (docs/reference.md#ignore-label).
IGNORE_INDEX = 255

Normalization = Literal["imagenet", "caffe_bgr"]

#: The reference DeepLab input: BGR channel order, this mean subtracted, no std scaling (Caffe/MSRA weights).
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675], dtype=np.float32)


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
    return np.array(Image.fromarray(arr).resize((size[1], size[0]), resample))  # writable, for torch.from_numpy


def pil_rescale(arr: np.ndarray, scale: float, resample: Image.Resampling) -> np.ndarray:
    """PIL resize to (round(h·s), round(w·s)) (reference ``imutils.pil_rescale``)."""
    h, w = arr.shape[:2]
    return pil_resize(arr, (round(h * scale), round(w * scale)), resample)


def normalize(image: np.ndarray, mode: Normalization) -> np.ndarray:
    """(H, W, 3) RGB in 0..255 → float32 network input (H, W, 3); the mean colour maps to 0 in both modes.

    ``imagenet``: RGB, (x/255 − mean)/std — what timm's torchvision-ImageNet ResNet weights expect.
    ``caffe_bgr``: BGR, x − (104.008, 116.669, 122.675) — the reference's Caffe-converted ResNet-101.
    """
    if mode == "imagenet":
        return imagenet_normalize(image)
    if mode == "caffe_bgr":
        return np.asarray(image, dtype=np.float32)[..., ::-1] - CAFFE_MEAN_BGR
    raise ValueError(f"data.normalization must be 'imagenet' or 'caffe_bgr', got {mode!r}")


class _RandomPilRescale(A.DualTransform):
    """A random rescale done with PIL as the reference's ``pil_rescale``: target size (round(h·s), round(w·s)) for
    the factor s of :meth:`draw`; images bicubic (antialiased when shrinking), masks nearest."""

    #: The option named when [lo, hi] is invalid.
    option = "range"

    def __init__(self, lo: float, hi: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 0 < lo <= hi:
            raise ValueError(f"{self.option} must be [lo, hi] with 0 < lo <= hi, got [{lo}, {hi}]")
        self.lo, self.hi = lo, hi

    def draw(self, h: int, w: int) -> float:
        raise NotImplementedError

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        scale = self.draw(h, w)
        return {"size": (round(h * scale), round(w * scale))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return pil_resize(img, size, Image.Resampling.BICUBIC)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return pil_resize(mask, size, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("lo", "hi")


class RandomResizeLong(_RandomPilRescale):
    """Rescale so that the long side is an integer drawn uniformly from [lo, hi] (reference random_resize_long):
    s = L / max(h, w)."""

    option = "resize_long"

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        lo: int
        hi: int

    def __init__(self, lo: int, hi: int, p: float = 1.0) -> None:  # albumentations validates each class's own
        super().__init__(lo, hi, p=p)

    def draw(self, h: int, w: int) -> float:
        return self.py_random.randint(self.lo, self.hi) / max(h, w)


class RandomRescale(_RandomPilRescale):
    """Rescale by a factor s drawn uniformly from [lo, hi) (reference ``imutils.random_scale``, IRN training)."""

    option = "rescale"

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        lo: float
        hi: float

    def __init__(self, lo: float, hi: float, p: float = 1.0) -> None:
        super().__init__(lo, hi, p=p)

    def draw(self, h: int, w: int) -> float:
        return self.py_random.uniform(self.lo, self.hi)  # lo + random()·(hi − lo), as the reference


class RandomScaleChoice(A.DualTransform):
    """Rescale by one factor drawn from ``scales`` (reference DeepLab ``VOCAug._augmentation``).

    Target size = (int(h·s), int(w·s)), truncated as the reference; images OpenCV bilinear (the reference resizes
    its float image with ``cv2.INTER_LINEAR``), masks PIL nearest.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        scales: tuple[float, ...]

    def __init__(self, scales: Sequence[float], p: float = 1.0) -> None:
        super().__init__(p=p)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
        self.scales = tuple(float(s) for s in scales)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        scale = self.py_random.choice(self.scales)
        return {"size": (int(h * scale), int(w * scale))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return pil_resize(mask, size, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales",)


class MaskStride(A.DualTransform):
    """Masks to a network's output grid: ``pil_rescale(mask, 1/stride, NEAREST)``; images untouched.

    The reference reduces IRN's label crop to its stride-4 grid this way (``VOC12AffinityDataset``).
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        stride: int

    def __init__(self, stride: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if stride < 1:
            raise ValueError(f"mask stride must be >= 1, got {stride}")
        self.stride = stride

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return pil_rescale(mask, 1 / self.stride, Image.Resampling.NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("stride",)


class ReferenceNormalize(A.ImageOnlyTransform):
    """:func:`normalize` as a pipeline step (``imagenet`` or ``caffe_bgr``), so padding placed after it is 0."""

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        mode: Normalization

    def __init__(self, mode: Normalization, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.mode = mode

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return normalize(img, self.mode)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mode",)


def seed_transform(transform: A.Compose, seed: int) -> A.Compose:
    """Seed every step of ``transform`` from one shared stream, as the reference draws from one Python ``random``.

    ``Compose.set_random_seed`` (and ``Compose(seed=)``) give each step its own generator with the same seed in
    albumentations 2.0.8, so the steps replay one sequence: the long side drawn by the rescale would set the crop
    offset (correlation 0.9) and two p = 0.5 steps would always agree.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def seed_from_torch(transform: A.Compose) -> A.Compose:
    """Seed ``transform`` from torch's global generator, so that ``seed_everything`` repeats num_workers=0 runs."""
    return seed_transform(transform, int(torch.randint(0, 2**31 - 1, ()).item()))


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker's albumentations pipeline (``dataset.transform``) its own seed.

    albumentations 2.x keeps its own random generators, seeded once when the Compose is built; forked
    workers would otherwise all replay the same augmentation sequence. The worker seed is PyTorch's
    (base seed drawn from the global generator + worker id), so runs under ``seed_everything`` repeat.
    """
    info = get_worker_info()
    if info is not None and isinstance(getattr(info.dataset, "transform", None), A.Compose):
        seed_transform(info.dataset.transform, info.seed % 2**32)


def _normalize() -> A.Normalize:
    return A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)


def _random_crop(crop_size: int, pad_position: Literal["random", "top_left"]) -> A.RandomCrop:
    """Random S × S window; a shorter axis is first padded to S (image 0 = the mean colour, masks 255), the image
    at a random offset (CAM / IRN ``random_crop``) or at the top-left (DeepLab ``VOCAug``)."""
    return A.RandomCrop(
        crop_size,
        crop_size,
        pad_if_needed=True,
        pad_position=pad_position,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=IGNORE_INDEX,
    )


def train_transform(
    crop_size: int,
    resize_long: Sequence[int] | None,
    *,
    rescale: Sequence[float] | None = None,
    hflip: bool = True,
    mask_stride: int = 1,
    additional_targets: dict[str, str] | None = None,
) -> A.Compose:
    """Reference training augmentation (docs/reference.md#normalisation-and-augmentation): CAM / CLIMS crops
    (docs/reference.md#stage-a-baseline-cam) with ``resize_long``, IRN crops (docs/reference.md#affinity-labels)
    with ``rescale`` and ``mask_stride=4``; ``None`` skips a rescale.

    Returns a Compose producing ``image`` as a (3, S, S) float tensor (and masks as (S/stride, S/stride) tensors).
    ``strict=True`` turns albumentations-1.x argument names (``value=``, ``mask_value=``) into errors
    instead of silently padding masks with 0.
    """
    steps: list[A.BasicTransform] = []
    if resize_long is not None:
        lo, hi = (int(v) for v in resize_long)
        steps.append(RandomResizeLong(lo, hi))
    if rescale is not None:
        lo, hi = (float(v) for v in rescale)
        steps.append(RandomRescale(lo, hi))
    steps.append(_normalize())
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(_random_crop(crop_size, "random"))
    if mask_stride > 1:
        steps.append(MaskStride(mask_stride))
    steps.append(ToTensorV2())
    return A.Compose(steps, additional_targets=additional_targets, strict=True)


def seg_train_transform(
    crop_size: int,
    scales: Sequence[float],
    *,
    hflip: bool = True,
    normalization: Normalization = "imagenet",
    additional_targets: dict[str, str] | None = None,
) -> A.Compose:
    """DeepLab training augmentation (docs/reference.md#deeplab-training): normalise, one scale from ``scales``,
    pad bottom/right to the crop (0 = the mean colour, masks 255), a random S × S crop, flip with p = 0.5.

    Normalising first equals the reference's resize-then-subtract: bilinear weights sum to 1.
    """
    steps: list[A.BasicTransform] = [
        ReferenceNormalize(normalization),
        RandomScaleChoice(scales),
        _random_crop(crop_size, "top_left"),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
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
