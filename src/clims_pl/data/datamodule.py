"""LightningDataModule for VOC-layout datasets (VOC2012 + SBD, or the generated toy world).

It owns the dataset's class list and its prompt bank, so a new dataset brings its own prompts. Datasets are
plain ``torch.utils.data.Dataset`` objects, so Lightning can inject its distributed samplers (DDP training and
the unrepeated sampler of DDP predict) without help.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clims_pl.config import check_number
from clims_pl.data import coco
from clims_pl.data.toy import generate_toy
from clims_pl.data.transforms import (
    imagenet_normalize,
    pil_resize,
    seed_from_torch,
    seed_worker_transform,
    train_transform,
    val_transform,
)
from clims_pl.data.voc import check_train_aug, image_labels, load_image, read_split, validate_voc_root
from clims_pl.prompts.bank import PromptBank, load_prompt_bank


class ClassificationDataset(Dataset):
    """Images with image-level labels through an albumentations pipeline: dict(image, label, id)."""

    def __init__(self, root: str | os.PathLike, ids: Sequence[str], labels: np.ndarray, transform: A.Compose):
        self.root, self.ids, self.labels, self.transform = Path(root), list(ids), labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.transform(image=load_image(self.root, image_id))["image"]
        return {"image": image, "label": torch.from_numpy(self.labels[index].copy()), "id": image_id}


class MultiScaleDataset(Dataset):
    """Multi-scale + flip inference input (reference VOC12ClassificationDatasetMSF, docs/reference.md#dataset-classes, docs/reference.md#stage-c-cam-inference).

    Item: ``id``, ``label`` (C,) float, ``size`` (H, W), ``images``: one (2, 3, h_s, w_s) float tensor per
    scale = [image, its horizontal flip], ImageNet-normalised, h_s = round(H·s) by PIL bicubic (scale 1.0 is
    the untouched image).
    """

    def __init__(
        self, root: str | os.PathLike, ids: Sequence[str], labels: np.ndarray, scales: Sequence[float]
    ) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"MultiScaleDataset: {len(ids)} ids but {len(labels)} label rows")
        self.root, self.ids, self.labels = Path(root), list(ids), labels
        self.scales = tuple(float(s) for s in scales)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        img = load_image(self.root, image_id)
        h, w = img.shape[:2]
        images = []
        for s in self.scales:
            scaled = img if s == 1.0 else pil_resize(img, (round(h * s), round(w * s)), Image.Resampling.BICUBIC)
            x = torch.from_numpy(imagenet_normalize(scaled)).permute(2, 0, 1)
            images.append(torch.stack([x, x.flip(-1)]))
        return {
            "id": image_id,
            "label": torch.from_numpy(self.labels[index].copy()),
            "size": (h, w),
            "images": images,
        }


def collate_multiscale(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch MultiScaleDataset items without stacking images (their sizes differ between images).

    Returns ``id`` list[str], ``label`` (N, C), ``size`` list[(H, W)], ``images`` list (per item) of
    per-scale (2, 3, h_s, w_s) tensors — with batch size 1, ``batch["images"][0]`` is the reference's input.
    """
    return {
        "id": [item["id"] for item in batch],
        "label": torch.stack([item["label"] for item in batch]),
        "size": [tuple(item["size"]) for item in batch],
        "images": [item["images"] for item in batch],
    }


def _validate_classes(classes: Sequence[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("data.classes is empty: list the dataset's class names in channel order")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"data.classes lists {', '.join(duplicates)} more than once: class names must be unique")
    return classes


class VOCDataModule(L.LightningDataModule):
    """Classification (train/val) and multi-scale inference (predict) data from a VOC-layout root.

    ``toy`` (a mapping of :func:`clims_pl.data.toy.generate_toy` options: seed, size, n_train_aug, n_train,
    n_val) makes the module generate the toy world into ``root`` when it is missing; null for real datasets.
    ``expected_train_aug`` (10582 for VOC2012 + SBD, null for the toy world) is checked when train_aug is read;
    ``strict`` turns that and objects of unknown classes in the XMLs from warnings into errors.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str],
        prompts: str = "voc",
        train_split: str = "train_aug",
        val_split: str = "val",
        infer_split: str = "train_aug",
        eval_split: str = "train",
        batch_size: int = 16,
        num_workers: int = 8,
        crop_size: int = 512,
        resize_long: Sequence[int] | None = (320, 640),
        scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        label_cache_dir: str | os.PathLike | None = None,
        predict_batch_size: int = 1,
        toy: Mapping[str, Any] | None = None,
        expected_train_aug: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        # Plain containers (not OmegaConf nodes) so checkpoints and hparams stay portable; every value is
        # checked here, when the config is built, with its data.* key.
        root = str(root)
        classes = _validate_classes(classes)
        batch_size = check_number("data.batch_size", batch_size, integer=True, ge=1)
        predict_batch_size = check_number("data.predict_batch_size", predict_batch_size, integer=True, ge=1)
        num_workers = check_number("data.num_workers", num_workers, integer=True, ge=0)
        crop_size = check_number("data.crop_size", crop_size, integer=True, ge=1)
        if resize_long is not None:
            resize_long = [check_number("data.resize_long", v, integer=True, ge=1) for v in resize_long]
            if len(resize_long) != 2 or resize_long[0] > resize_long[1]:
                raise ValueError(
                    f"data.resize_long={resize_long} is invalid: it must be [lo, hi] with lo <= hi, or null"
                )
        scales = [check_number("data.scales", s, gt=0) for s in scales]
        if expected_train_aug is not None:
            expected_train_aug = check_number("data.expected_train_aug", expected_train_aug, integer=True, ge=1)
        label_cache_dir = None if label_cache_dir is None else str(label_cache_dir)
        toy = None if toy is None else {str(k): v for k, v in dict(toy).items()}
        if not scales:
            raise ValueError("data.scales is empty: give at least one inference scale, e.g. [1.0]")
        self.save_hyperparameters(logger=False)
        self._splits: dict[str, tuple[list[str], np.ndarray]] = {}
        # Read now: the bank must list exactly data.classes, so a misspelt class fails here, also in the
        # baseline (which never uses prompts) instead of training a class no annotation ever names.
        self._prompt_bank: PromptBank = load_prompt_bank(prompts, classes=classes)

    # ------------------------------------------------------------------------------------------ metadata
    @property
    def root(self) -> Path:
        return Path(self.hparams.root).expanduser()

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes)

    @property
    def num_classes(self) -> int:
        return len(self.hparams.classes)

    @property
    def prompt_bank(self) -> PromptBank:
        """Class text names, templates and background prompts of this dataset."""
        return self._prompt_bank

    # ----------------------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Generate the toy world if configured and missing (Lightning calls this on one process per node)."""
        self._ensure_toy()

    def setup(self, stage: str | None = None) -> None:
        """Check the root (and generate the toy world when used without a Trainer) before any loader is built."""
        self._ensure_toy()
        splits = {self.hparams.train_split, self.hparams.val_split, self.hparams.infer_split}
        validate_voc_root(self.root, need_aug="train_aug" in splits)

    def _ensure_toy(self) -> None:
        if self.hparams.toy is not None:
            generate_toy(self.root, **self.hparams.toy)

    def split(self, name: str) -> tuple[list[str], np.ndarray]:
        """(ids, (N, C) labels) of a split, read once and memoised."""
        if name not in self._splits:
            ids = read_split(self.root, name)
            if name == "train_aug" and self.hparams.expected_train_aug is not None:
                check_train_aug(self.root, ids, self.hparams.expected_train_aug, strict=self.hparams.strict)
            labels = image_labels(
                self.root, ids, self.classes, self.hparams.label_cache_dir, strict=self.hparams.strict
            )
            self._splits[name] = (ids, labels)
        return self._splits[name]

    # --------------------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = int(self.hparams.num_workers)
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker_transform,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, drop_last batches of reference-augmented crops (docs/reference.md#normalisation-and-augmentation): dict(image, label, id)."""
        ids, labels = self.split(self.hparams.train_split)
        if len(ids) < self.hparams.batch_size:
            raise ValueError(
                f"split {self.hparams.train_split!r} has {len(ids)} images, fewer than data.batch_size="
                f"{self.hparams.batch_size}: with drop_last there would be no batch; lower the batch size"
            )
        transform = seed_from_torch(train_transform(self.hparams.crop_size, self.hparams.resize_long))
        dataset = ClassificationDataset(self.root, ids, labels, transform)
        return self._loader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Deterministic top-left crops of the val split (docs/reference.md#stage-a-baseline-cam validation loss)."""
        ids, labels = self.split(self.hparams.val_split)
        dataset = ClassificationDataset(self.root, ids, labels, val_transform(self.hparams.crop_size))
        return self._loader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def predict_dataset(self, split: str | None = None) -> MultiScaleDataset:
        """Multi-scale + flip inference dataset of ``split`` (default: infer_split)."""
        ids, labels = self.split(split or self.hparams.infer_split)
        return MultiScaleDataset(self.root, ids, labels, self.hparams.scales)

    def predict_dataloader(self) -> DataLoader:
        """infer_split in order, ``predict_batch_size`` (1) images per batch, collated by collate_multiscale."""
        return self._loader(
            self.predict_dataset(),
            batch_size=self.hparams.predict_batch_size,
            shuffle=False,
            collate_fn=collate_multiscale,
        )


class COCODataModule(VOCDataModule):
    """:class:`VOCDataModule` on the COCO 2014 layout: splits and labels from the instances files.

    Loaders, transforms and the multi-scale inference input are the VOC ones (images are read by id, and COCO
    ids name their folder); only where ids and labels come from differs.
    """

    def setup(self, stage: str | None = None) -> None:
        """Check every configured split's instances file and image folder before any loader is built."""
        for split in {self.hparams.train_split, self.hparams.val_split, self.hparams.infer_split}:
            coco.annotation_file(self.root, split)

    def split(self, name: str) -> tuple[list[str], np.ndarray]:
        """(ids, (N, 80) labels) of a split such as ``train2014`` or ``train2014:10000``, memoised."""
        if name not in self._splits:
            self._splits[name] = coco.coco_labels(self.root, name, self.classes, self.hparams.label_cache_dir)
        return self._splits[name]
