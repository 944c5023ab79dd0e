"""IRN training data (docs/reference.md#affinity-labels, ``VOC12AffinityDataset``): image crops + IR labels at 1/4 scale.

The crops come from :func:`clims_pl.data.transforms.train_transform` (``rescale``, ``mask_stride=4``) on
:class:`clims_pl.data.segmentation.LabelDataset` items.

The reference turns each label crop into three (D, P) float tensors per sample (~24 MB each at crop 512); here
the dataset returns only the stride-4 label (128×128 bytes) and :func:`affinity_labels` builds the same three
masks on the device, batched, from the path index. The numbers are identical.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from clims_pl.config import check_number
from clims_pl.data.segmentation import LabelDirDataModule
from clims_pl.data.transforms import train_transform

#: IRN's edge map (and so its label) lives on the stride-4 grid of the crop.
LABEL_STRIDE = 4


def affinity_labels(
    label: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg_pos, fg_pos, neg) float masks (B, D, P) of every path-index pair (reference GetAffinityLabelFromIndices).

    With a = label(src), b = label(dst): valid = a, b ≤ num_classes (255 = unsure is invalid);
    bg_pos = valid ∧ a = b = 0; fg_pos = valid ∧ a = b > 0; neg = valid ∧ a ≠ b.

    Args:
        label: (B, h, w) integer labels on the path-index grid; src: (P,), dst: (D, P) flat indices.
    """
    flat = label.reshape(label.shape[0], -1)
    a = flat[:, src].unsqueeze(1)
    b = flat[:, dst]
    valid = (a <= num_classes) & (b <= num_classes)
    equal = a == b
    bg_pos = valid & equal & (a == 0)
    fg_pos = valid & equal & (a > 0)
    neg = valid & ~equal
    return bg_pos.float(), fg_pos.float(), neg.float()


class AffinityDataModule(LabelDirDataModule):
    """IRN training crops of ``train_split`` with IR labels from ``label_dir`` (shuffled, drop_last)."""

    label_stage = "IR-label"

    def __init__(
        self,
        root: str | os.PathLike,
        label_dir: str | os.PathLike,
        classes: Sequence[str],
        train_split: str = "train_aug",
        batch_size: int = 32,
        num_workers: int = 8,
        crop_size: int = 512,
        rescale: Sequence[float] = (0.5, 1.5),
        flip: bool = True,
    ) -> None:
        super().__init__(root, label_dir, classes, train_split, batch_size, num_workers, crop_size)
        self.rescale = tuple(check_number("data.rescale", s, gt=0) for s in rescale)
        if len(self.rescale) != 2 or self.rescale[0] > self.rescale[1]:
            raise ValueError(f"data.rescale={list(rescale)} is invalid: it must be [lo, hi] with 0 < lo <= hi")
        self.flip = flip

    def train_dataloader(self) -> DataLoader:
        """Reference order: random rescale (image bicubic, label nearest) → ImageNet-normalise → flip → random crop
        (image 0, label 255, a smaller image at a random offset) → label ×1/4 with PIL nearest."""
        transform = train_transform(
            self.crop_size,
            None,
            rescale=self.rescale,
            hflip=self.flip,
            mask_stride=LABEL_STRIDE,
            additional_targets={"label": "mask"},
        )
        return self.train_loader(transform, drop_last=True)
