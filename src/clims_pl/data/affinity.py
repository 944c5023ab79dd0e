"""IRN training data (docs/reference.md#affinity-labels, ``VOC12AffinityDataset``): image crops + IR labels at 1/4 scale.

The reference turns each label crop into three (D, P) float tensors per sample (~24 MB each at crop 512); here
the dataset returns only the stride-4 label (128×128 bytes) and :func:`affinity_labels` builds the same three
masks on the device, batched, from the path index. The numbers are identical.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clims_pl.config import check_number
from clims_pl.data.segmentation import LabelDirDataModule, load_label, to_tensor
from clims_pl.data.transforms import IGNORE_INDEX, imagenet_normalize, pil_resize
from clims_pl.data.voc import load_image


def pil_rescale(array: np.ndarray, scale: float, resample: Image.Resampling) -> np.ndarray:
    """PIL resize to (round(h·s), round(w·s)) (reference ``imutils.pil_rescale``)."""
    h, w = array.shape[:2]
    return pil_resize(array, (round(h * scale), round(w * scale)), resample)


def random_crop(
    image: np.ndarray, label: np.ndarray, crop_size: int, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``random_crop``: an S×S container (image 0, label 255); per axis a random window of a longer
    side, or a random offset of a shorter one inside the container."""

    def axis(length: int) -> tuple[int, int, int]:
        space = length - crop_size
        if space > 0:
            return 0, random.randrange(space + 1), crop_size  # container offset, image offset, extent
        return random.randrange(-space + 1), 0, length

    cont_top, img_top, ch = axis(image.shape[0])
    cont_left, img_left, cw = axis(image.shape[1])
    image_out = np.zeros((crop_size, crop_size, image.shape[2]), image.dtype)
    label_out = np.full((crop_size, crop_size), ignore_index, label.dtype)
    image_out[cont_top : cont_top + ch, cont_left : cont_left + cw] = image[
        img_top : img_top + ch, img_left : img_left + cw
    ]
    label_out[cont_top : cont_top + ch, cont_left : cont_left + cw] = label[
        img_top : img_top + ch, img_left : img_left + cw
    ]
    return image_out, label_out


class AffinityDataset(Dataset):
    """Reference order: random scale (image bicubic, label nearest) → ImageNet-normalise → flip → random crop
    (image 0, label 255); the label crop is then reduced ×0.25 with PIL nearest."""

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        label_dir: str | os.PathLike,
        crop_size: int = 512,
        rescale: Sequence[float] = (0.5, 1.5),
        flip: bool = True,
    ) -> None:
        self.root, self.ids, self.label_dir = Path(root), list(ids), Path(label_dir)
        self.crop_size, self.rescale, self.flip = crop_size, tuple(rescale), flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = load_image(self.root, image_id)
        label = load_label(self.label_dir, image_id, image.shape[:2])
        lo, hi = self.rescale
        scale = lo + random.random() * (hi - lo)
        image = imagenet_normalize(pil_rescale(image, scale, Image.Resampling.BICUBIC))
        label = pil_rescale(label, scale, Image.Resampling.NEAREST)
        if self.flip and random.getrandbits(1):
            image, label = image[:, ::-1], label[:, ::-1]
        image, label = random_crop(image, label, self.crop_size)
        small = pil_rescale(label, 0.25, Image.Resampling.NEAREST)
        return {"image": to_tensor(image), "label": torch.from_numpy(small.astype(np.int64)), "id": image_id}


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
        dataset = AffinityDataset(self.root, self.train_ids(), self.label_dir, self.crop_size, self.rescale, self.flip)
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"data.train_split={self.train_split} has {len(dataset)} images, fewer than "
                f"data.batch_size={self.batch_size} (batches drop the remainder): lower the batch size"
            )
        return self.train_loader(dataset, drop_last=True)
