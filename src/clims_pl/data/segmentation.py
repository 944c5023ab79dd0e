"""DeepLab-v2 data (docs/reference.md#deeplab-training): images + label PNGs (pseudo labels for training, VOC masks for val/test).

Training augmentation follows the reference ``VOCAug``: one scale drawn from a list, image resized bilinearly and
label by nearest to (int(h·s), int(w·s)), padded bottom/right to the crop (mean colour / 255), a random crop and
a horizontal flip with p = 0.5. Normalisation is selectable (see :func:`normalize`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clims_pl.config import check_number
from clims_pl.data.imageio import read_label_png
from clims_pl.data.transforms import IGNORE_INDEX, imagenet_normalize, pil_resize
from clims_pl.data.voc import load_image, load_mask, read_split

Normalization = Literal["imagenet", "caffe_bgr"]

#: The reference DeepLab input: BGR channel order, this mean subtracted, no std scaling (Caffe/MSRA weights).
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675], dtype=np.float32)


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


def load_label(label_dir: str | os.PathLike, image_id: str, size: tuple[int, ...]) -> np.ndarray:
    """(H, W) uint8 label of ``<label_dir>/<id>.png`` (pseudo or IR labels), with a clear error when missing or
    not of the image's ``size`` (H, W)."""
    path = Path(label_dir) / f"{image_id}.png"
    label = read_label_png(path)
    if label.shape != tuple(size):
        raise ValueError(
            f"{path}: size {label.shape} differs from the image's {tuple(size)}; the labels in {label_dir} were "
            "made for other images: rerun the stage that wrote them on this data.root"
        )
    return label


def scale_pad_crop_flip(
    image: np.ndarray,
    label: np.ndarray,
    scales: Sequence[float],
    crop_size: int,
    flip: bool,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``_augmentation`` on a normalised image (so the mean-colour padding is 0) and its label."""
    scale = random.choice(list(scales))
    h, w = int(label.shape[0] * scale), int(label.shape[1] * scale)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = pil_resize(label, (h, w), Image.Resampling.NEAREST)
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0.0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
    top = random.randint(0, label.shape[0] - crop_size)
    left = random.randint(0, label.shape[1] - crop_size)
    image = image[top : top + crop_size, left : left + crop_size]
    label = label[top : top + crop_size, left : left + crop_size]
    if flip and random.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float → contiguous (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class SegTrainDataset(Dataset):
    """Random-scale / crop / flip samples of ``ids`` with labels from ``label_dir`` (reference VOCAug, train)."""

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        label_dir: str | os.PathLike,
        crop_size: int = 321,
        scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
        flip: bool = True,
        normalization: Normalization = "imagenet",
    ) -> None:
        self.root, self.ids, self.label_dir = Path(root), list(ids), Path(label_dir)
        self.crop_size, self.scales, self.flip, self.normalization = crop_size, tuple(scales), flip, normalization

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = normalize(load_image(self.root, image_id), self.normalization)
        label = load_label(self.label_dir, image_id, image.shape[:2])
        image, label = scale_pad_crop_flip(image, label, self.scales, self.crop_size, self.flip)
        return {"image": to_tensor(image), "label": torch.from_numpy(label.astype(np.int64)), "id": image_id}


class SegEvalDataset(Dataset):
    """Full-size images (and ground truth) of ``ids``: ``gt='aug'`` SegmentationClassAug (reference val),
    ``'voc'`` SegmentationClass, ``None`` none (test split)."""

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        gt: Literal["aug", "voc"] | None = "aug",
        normalization: Normalization = "imagenet",
    ) -> None:
        if gt not in ("aug", "voc", None):
            raise ValueError(f"ground truth source must be 'aug', 'voc' or null, got {gt!r}")
        self.root, self.ids, self.gt, self.normalization = Path(root), list(ids), gt, normalization

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        item = {"image": to_tensor(normalize(load_image(self.root, image_id), self.normalization)), "id": image_id}
        if self.gt is not None:
            item["label"] = torch.from_numpy(load_mask(self.root, image_id, aug=self.gt == "aug").astype(np.int64))
        return item


class LabelDirDataModule(L.LightningDataModule):
    """What the DataModules trained on a stage's label PNGs share (DeepLab on pseudo labels, IRN on IR labels): the
    checked sizes, the label folder check and the shuffled train loader."""

    #: The stage that writes ``label_dir``, named when the folder is missing.
    label_stage = "label"

    def __init__(
        self,
        root: str | os.PathLike,
        label_dir: str | os.PathLike,
        classes: Sequence[str],
        train_split: str,
        batch_size: int,
        num_workers: int,
        crop_size: int,
    ) -> None:
        super().__init__()
        self.root, self.label_dir, self.classes = Path(root), Path(label_dir), list(classes)
        self.train_split = train_split
        self.batch_size = check_number("data.batch_size", batch_size, integer=True, ge=1)
        self.num_workers = check_number("data.num_workers", num_workers, integer=True, ge=0)
        self.crop_size = check_number("data.crop_size", crop_size, integer=True, ge=1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_ids(self) -> list[str]:
        """Ids of ``train_split``, once the label folder exists."""
        if not self.label_dir.is_dir():
            raise FileNotFoundError(
                f"data.label_dir={self.label_dir} does not exist: run the {self.label_stage} stage first"
            )
        return read_split(self.root, self.train_split)

    def train_loader(self, dataset: Dataset, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )


class SegDataModule(LabelDirDataModule):
    """DeepLab training on pseudo labels (``label_dir``) and validation on ground truth.

    Args:
        root: VOC2012 folder; ``classes``: foreground class names (the net predicts len + 1 with background).
        label_dir: training labels (``<pseudo stage>/pseudo``); ``val_gt``: 'aug' (reference) or 'voc'.
        batch_size: per optimiser micro-batch (reference 10, with ``trainer.accumulate_grad_batches=2``).
    """

    label_stage = "pseudo-label"

    def __init__(
        self,
        root: str | os.PathLike,
        label_dir: str | os.PathLike,
        classes: Sequence[str],
        train_split: str = "train_aug",
        val_split: str | None = "val",
        batch_size: int = 10,
        num_workers: int = 8,
        crop_size: int = 321,
        scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
        flip: bool = True,
        normalization: Normalization = "imagenet",
        val_gt: Literal["aug", "voc"] = "aug",
    ) -> None:
        super().__init__(root, label_dir, classes, train_split, batch_size, num_workers, crop_size)
        self.val_split = val_split
        self.scales = tuple(check_number("data.scales", s, gt=0) for s in scales)
        self.flip = flip
        self.normalization, self.val_gt = normalization, val_gt

    def train_dataloader(self) -> DataLoader:
        dataset = SegTrainDataset(
            self.root, self.train_ids(), self.label_dir, self.crop_size, self.scales, self.flip, self.normalization
        )
        return self.train_loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_split:
            return []
        dataset = SegEvalDataset(self.root, read_split(self.root, self.val_split), self.val_gt, self.normalization)
        return DataLoader(dataset, batch_size=1, num_workers=self.num_workers)
