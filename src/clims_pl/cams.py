"""Multi-scale CAM inference (reference stage C, docs/reference.md#stage-c-cam-inference; quirk docs/reference.md#q7-training-vs-inference-cams) as a Lightning predict stage.

For every image: scales (1.0, 0.5, 1.5, 2.0) × horizontal flip, ReLU'd per-pixel logits (no sigmoid), the
flipped copy flipped back and added, summed over scales; kept for the ground-truth classes only and divided by
their own max + 1e-5. Two maps per class:

* ``cam``      (K, ⌈H/4⌉, ⌈W/4⌉): each scale's map resized straight to the stride-4 size;
* ``high_res`` (K, H, W): each scale's map resized to (16·⌈H/16⌉, 16·⌈W/16⌉), summed, then top-left cropped.

Written as plain numpy ``cams/<id>.npz`` (``keys`` int64 (K,), ``cam``, ``high_res`` float32) by a
``BasePredictionWriter`` as each batch finishes. A rerun skips ids whose file loads cleanly and recomputes
corrupt ones; under DDP Lightning's unrepeated distributed sampler gives every id to exactly one rank.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from clims_pl.io import atomic_save_npz, remove_stale_temps

log = logging.getLogger(__name__)

#: Added to each class map's max before dividing (docs/reference.md#stage-c-cam-inference).
NORM_EPS = 1e-5


def strided_size(size: Sequence[int], stride: int = 4) -> tuple[int, int]:
    """(⌈H/stride⌉, ⌈W/stride⌉), computed as (H−1)//stride+1 like the reference."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size: Sequence[int]) -> tuple[int, int]:
    """(16·⌈H/16⌉, 16·⌈W/16⌉): high_res is upsampled to this multiple of 16, then cropped (docs/reference.md#q7-training-vs-inference-cams)."""
    h, w = strided_size(size, 16)
    return 16 * h, 16 * w


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each class map divided by its own spatial max + 1e-5."""
    return maps / (maps.amax(dim=(1, 2), keepdim=True) + NORM_EPS)


@torch.no_grad()
def multiscale_cam(
    net: nn.Module,
    images: Sequence[torch.Tensor],
    size: Sequence[int],
    keys: torch.Tensor | np.ndarray | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (K, ⌈H/4⌉, ⌈W/4⌉), high_res (K, H, W)) of one image, usable without Lightning.

    Args:
        net: maps (N, 3, h, w) to per-pixel logits (N, C, ⌈h/16⌉, ⌈w/16⌉), in eval mode (BN running stats).
        images: one (2, 3, h_s, w_s) tensor per scale = [image, hflip(image)]; one forward per scale.
        size: the original (H, W).
        keys: class indices to keep (ground-truth classes, sorted); empty gives (0, ...) maps and no forward.

    Classes are selected before upsampling: bilinear resizing acts per channel, so this is exact and saves
    20/K of the interpolation work.
    """
    height, width = int(size[0]), int(size[1])
    device = images[0].device
    keys = torch.as_tensor(np.asarray(keys, dtype=np.int64), device=device)
    small, up = strided_size((height, width)), strided_up_size((height, width))
    cam = torch.zeros((len(keys), *small), device=device)
    high_res = torch.zeros((len(keys), *up), device=device)
    if len(keys) == 0:
        return cam, high_res[:, :height, :width]
    for pair in images:
        logits = net(pair)[:, keys].float()
        scale_map = (F.relu(logits[0]) + F.relu(logits[1]).flip(-1))[None]
        cam += F.interpolate(scale_map, small, mode="bilinear", align_corners=False)[0]
        high_res += F.interpolate(scale_map, up, mode="bilinear", align_corners=False)[0]
    return _normalise(cam), _normalise(high_res[:, :height, :width])


class CamFileError(ValueError):
    """A CAM file is missing, truncated or inconsistent; the message names the file and what to do."""


def load_cam(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``keys``, ``cam``, ``high_res`` of one ``<id>.npz``, fully read (zip CRCs checked) and shape-checked."""
    path = Path(path)
    fix = "delete it and rerun clims-infer to recompute it"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("keys", "cam", "high_res")}
    except FileNotFoundError as err:
        raise CamFileError(f"{path}: no such CAM file; run clims-infer on a split that contains this id") from err
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CamFileError(f"{path}: unreadable CAM file ({type(err).__name__}: {err}); {fix}") from err
    keys, cam, high_res = arrays["keys"], arrays["cam"], arrays["high_res"]
    k = len(keys)
    if keys.ndim != 1 or cam.ndim != 3 or high_res.ndim != 3 or len(cam) != k or len(high_res) != k:
        raise CamFileError(f"{path}: inconsistent shapes keys {keys.shape}, cam {cam.shape}; {fix}")
    if cam.shape[1:] != strided_size(high_res.shape[1:]):
        raise CamFileError(f"{path}: cam {cam.shape} is not the stride-4 size of high_res {high_res.shape}; {fix}")
    return arrays


def pending_ids(ids: Sequence[str], out_dir: str | os.PathLike) -> list[str]:
    """Ids of ``ids`` without a valid ``<out_dir>/<id>.npz``; corrupt files and a killed writer's temps are removed."""
    out_dir = Path(out_dir)
    remove_stale_temps(out_dir)
    todo = []
    for image_id in ids:
        path = out_dir / f"{image_id}.npz"
        if not path.exists():
            todo.append(image_id)
            continue
        try:
            load_cam(path)
        except CamFileError as err:
            log.warning("recomputing %s", err)
            path.unlink(missing_ok=True)
            todo.append(image_id)
    return todo


class CAMInference(L.LightningModule):
    """Wraps the CAM network for ``trainer.predict``: one multiscale_cam per image of the batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``batch`` from ``collate_multiscale``; keys = the image's ground-truth classes (label == 1)."""
        out = []
        items = zip(batch["id"], batch["label"], batch["size"], batch["images"], strict=True)
        for image_id, label, size, images in items:
            keys = torch.nonzero(label > 0.5).flatten()
            cam, high_res = multiscale_cam(self.net, images, size, keys)
            out.append({"id": image_id, "keys": keys, "cam": cam, "high_res": high_res})
        return out


class CamWriter(BasePredictionWriter):
    """Writes each finished batch's maps to ``<out_dir>/<id>.npz`` atomically (plain numpy arrays)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for item in prediction:
            atomic_save_npz(
                self.out_dir / f"{item['id']}.npz",
                keys=item["keys"].cpu().numpy().astype(np.int64),
                cam=item["cam"].cpu().numpy().astype(np.float32),
                high_res=item["high_res"].cpu().numpy().astype(np.float32),
            )


def predict_cams(
    net: nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    trainer: Mapping[str, Any] | DictConfig,
    batch_size: int = 1,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Write ``<out_dir>/<id>.npz`` for every id of ``dataset`` (a MultiScaleDataset) that lacks a valid file.

    ``trainer`` is a Trainer config with ``_target_`` (e.g. ``cfg.trainer``); the CamWriter is added and logging
    is off. Returns counts and wall time. Raises RuntimeError if some id still has no file afterwards.
    """
    from clims_pl.data.datamodule import collate_multiscale

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = list(dataset.ids)
    todo = set(pending_ids(ids, out_dir))
    subset = Subset(dataset, [i for i, image_id in enumerate(ids) if image_id in todo])
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_multiscale,
        shuffle=False,
        pin_memory=torch.cuda.is_available(),
    )
    start = time.perf_counter()
    if todo:
        pl_trainer = instantiate(trainer, callbacks=[CamWriter(out_dir)], logger=False)
        pl_trainer.predict(CAMInference(net.eval()), dataloaders=loader, return_predictions=False)
        pl_trainer.strategy.barrier("cams-written")  # ranks of a re-launched DDP job wait for each other's files
    missing = [i for i in ids if not (out_dir / f"{i}.npz").is_file()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} CAM files missing after inference (e.g. {missing[0]})")
    return {
        "ids": len(ids),
        "computed": len(todo),
        "skipped": len(ids) - len(todo),
        "wall_time_s": time.perf_counter() - start,
    }
