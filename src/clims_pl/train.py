"""`clims-train`: fit any LightningModule/DataModule pair described by the config (CAM, CLIMS, IRN, DeepLab)."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from clims_pl.io import atomic_write_json
from clims_pl.models.checkpoint import CheckpointError, load_error
from clims_pl.runtime import instantiate_group, log, prepare_run


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """``last`` means ``<run>/checkpoints/last.ckpt`` if it exists (resume), else a fresh start.

    Hydra makes a new run dir per launch, so resuming an old run needs ``hydra.run.dir=<that run>``.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last but %s does not exist: starting from scratch", last)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint")
    if not zipfile.is_zipfile(ckpt_path):  # what torch.save writes; a text or truncated file fails deep in Lightning
        raise CheckpointError(f"ckpt_path={ckpt_path}: not a Lightning checkpoint (not a torch.save archive)")
    return ckpt_path


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, save ``checkpoints/last.ckpt`` and ``metrics/train.json``; return the final logged metrics."""
    out = prepare_run(cfg)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    # Fail on a bad dataset root before anything slow (pretrained weights, CLIP) is built.
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Plain dicts/lists (not DictConfig) reach the module, so its hyper-parameters survive Lightning's
    # weights_only checkpoint loading on resume.
    model: L.LightningModule = instantiate(cfg.model, _convert_="all")
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
    )
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out / "checkpoints")
    # weights_only: a resumed checkpoint never unpickles code (ours hold plain containers only).
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise load_error("ckpt_path", ckpt_path, err) from err
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = trainer.global_step
    if trainer.optimizers:
        metrics["lr_final"] = trainer.optimizers[0].param_groups[0]["lr"]
    if trainer.is_global_zero:
        atomic_write_json(out / "metrics" / "train.json", metrics)
        log.info("train metrics: %s", json.dumps(metrics))
    return metrics
