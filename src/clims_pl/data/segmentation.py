"""DeepLab-v2 data (docs/reference.md#deeplab-training): images + label PNGs (pseudo labels for training, VOC masks for val/test).

Training augmentation follows the reference ``VOCAug`` (:func:`clims_pl.data.transforms.seg_train_transform`): one
scale drawn from a list, image resized bilinearly and label by nearest to (int(h·s), int(w·s)), padded
bottom/right to the crop (mean colour / 255), a random crop and a horizontal flip with p = 0.5. Normalisation is
selectable (:func:`clims_pl.data.transforms.normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clims_pl.config import check_number
from clims_pl.data.imageio import read_label_png
from clims_pl.data.transforms import (
    Normalization,
    normalize,
    seed_from_torch,
    seed_worker_transform,
    seg_train_transform,
)
from clims_pl.data.voc import load_image, load_mask, read_split


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


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float → contiguous (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class LabelDataset(Dataset):
    """Images of ``ids`` with their label PNGs from ``label_dir`` through an albumentations pipeline whose label
    target is ``label`` (``additional_targets={"label": "mask"}``): dict(image, label int64, id). Training data of
    DeepLab (pseudo labels) and IRN (IR labels); ``transform`` is seeded by the DataModule (and per worker)."""

    def __init__(
        self, root: str | os.PathLike, ids: Sequence[str], label_dir: str | os.PathLike, transform: A.Compose
    ) -> None:
        self.root, self.ids, self.label_dir, self.transform = Path(root), list(ids), Path(label_dir), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = load_image(self.root, image_id)
        label = load_label(self.label_dir, image_id, image.shape[:2])
        out = self.transform(image=image, label=label)
        return {"image": out["image"], "label": out["label"].long(), "id": image_id}


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

    def train_loader(self, transform: A.Compose, drop_last: bool = False) -> DataLoader:
        """Shuffled batches of :class:`LabelDataset` crops; ``transform`` is seeded from torch's generator and again
        in each worker, so the same ``seed`` gives the same batches."""
        dataset = LabelDataset(self.root, self.train_ids(), self.label_dir, seed_from_torch(transform))
        if drop_last and len(dataset) < self.batch_size:
            raise ValueError(
                f"data.train_split={self.train_split} has {len(dataset)} images, fewer than "
                f"data.batch_size={self.batch_size} (batches drop the remainder): lower the batch size"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker_transform,
        )


def paste_foreground(
    images: torch.Tensor, labels: torch.Tensor, p: float, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-paste against context shortcuts: each crop of the batch, with probability ``p``, gets the labelled
    foreground (classes 1.., not background or ``ignore_index``) of another crop of the batch pasted over it,
    pixels and labels, at the same position.

    Why: a segmenter trained without image labels can tell classes apart by their usual surroundings (a cow by its
    grass) instead of the object; pasting objects onto other crops' backgrounds takes that cue away (Su et al.,
    "Context Decoupling Augmentation for Weakly Supervised Semantic Segmentation", ICCV 2021, do this with pseudo
    masks). Not in the reference: off unless ``data.copy_paste`` > 0. ``images`` (B, 3, H, W), ``labels`` (B, H, W);
    draws from torch's global generator, so a seeded run repeats itself.
    """
    batch = images.shape[0]
    if batch < 2 or p <= 0:
        return images, labels
    device = images.device
    # A donor other than the crop itself: a random non-zero shift of the batch order.
    donor = (torch.arange(batch) + torch.randint(1, batch, (1,))) % batch
    chosen = torch.rand(batch) < p
    donor, chosen = donor.to(device), chosen.to(device)
    donor_labels = labels[donor]
    paste = (donor_labels > 0) & (donor_labels != ignore_index) & chosen[:, None, None]
    return torch.where(paste[:, None], images[donor], images), torch.where(paste, donor_labels, labels)


class SegDataModule(LabelDirDataModule):
    """DeepLab training on pseudo labels (``label_dir``) and validation on ground truth.

    Args:
        root: VOC2012 folder; ``classes``: foreground class names (the net predicts len + 1 with background).
        label_dir: training labels (``<pseudo stage>/pseudo``); ``val_gt``: 'aug' (reference) or 'voc'.
        batch_size: per optimiser micro-batch (reference 10, with ``trainer.accumulate_grad_batches=2``).
        copy_paste: probability that a training crop gets another crop's foreground pasted over it
            (:func:`paste_foreground`); 0 = the reference (none).
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
        copy_paste: float = 0.0,
    ) -> None:
        super().__init__(root, label_dir, classes, train_split, batch_size, num_workers, crop_size)
        self.copy_paste = float(check_number("data.copy_paste", copy_paste, ge=0))
        if self.copy_paste > 1:
            raise ValueError(f"data.copy_paste={copy_paste} is a probability: give a value in [0, 1] (0 = off)")
        self.val_split = val_split
        self.scales = tuple(check_number("data.scales", s, gt=0) for s in scales)
        if not self.scales:
            raise ValueError("data.scales is empty: give the training scales to draw from, e.g. [1.0]")
        self.flip = flip
        self.normalization, self.val_gt = normalization, val_gt

    def train_dataloader(self) -> DataLoader:
        transform = seg_train_transform(
            self.crop_size,
            self.scales,
            hflip=self.flip,
            normalization=self.normalization,
            additional_targets={"label": "mask"},
        )
        return self.train_loader(transform)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Training batches only: :func:`paste_foreground` with ``copy_paste`` (on the device, batch-wide)."""
        if self.copy_paste > 0 and self.trainer is not None and self.trainer.training:
            batch["image"], batch["label"] = paste_foreground(batch["image"], batch["label"], self.copy_paste)
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_split:
            return []
        dataset = SegEvalDataset(self.root, read_split(self.root, self.val_split), self.val_gt, self.normalization)
        return DataLoader(dataset, batch_size=1, num_workers=self.num_workers)
