"""`clims-train`: fit any LightningModule/DataModule pair described by the config (CAM, CLIMS, IRN, DeepLab)."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_write_json
from clims_pl.models.checkpoint import CheckpointError, load_error
from clims_pl.provenance import claim, config_hash, identity
from clims_pl.runtime import instantiate_group, log, prepare_run

#: Keys that do not change what training produces: a run may resume with another logger, checkpoint interval or
#: run folder. Everything else (model, data, optimiser, trainer, seed) must equal the checkpoint's.
RESUME_IGNORES = (
    "logger",
    "callbacks",
    "ckpt_path",
    "print_config",
    "paths",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
)
#: Files and folders a run reads besides the dataset images: their identity is part of the checkpoint's provenance.
TRAIN_INPUTS = ("model.init_ckpt", "model.net.pretrained", "clip.pretrained", "data.label_dir")
#: Where a run's provenance is kept, next to the checkpoints it describes.
CKPT_RECORD = "checkpoints/provenance.json"


def training_record(cfg: DictConfig) -> dict[str, Any]:
    """The provenance of this run's checkpoints: config hash (without RESUME_IGNORES) and the identity of every
    TRAIN_INPUTS path that exists (a retrained init checkpoint or rewritten label folder is another run)."""
    inputs = {}
    for key in TRAIN_INPUTS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and Path(value).exists():
            inputs[key] = identity(value)
    return {"config_hash": config_hash(cfg, RESUME_IGNORES), "inputs": inputs}


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path, resumable: bool = True) -> str | None:
    """``last`` means ``<run>/checkpoints/last.ckpt`` if it exists and is ``resumable`` (same provenance), else a
    fresh start.

    Hydra makes a new run dir per launch, so resuming an old run needs ``hydra.run.dir=<that run>``.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        if resumable and last.is_file():
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
    return fit(cfg)[1]


def fit(cfg: DictConfig) -> tuple[L.LightningModule, dict[str, Any]]:
    """:func:`run`, returning the trained module too (a stage that exports or evaluates it after training).

    ``ckpt_path=last`` resumes this run folder's ``last.ckpt`` only when its provenance (``checkpoints/
    provenance.json``) equals this run's; otherwise, and without ``ckpt_path``, the folder's earlier checkpoints
    and CSV rows are deleted and training starts from step 0. An explicit ``ckpt_path=<file>`` is used as given.
    """
    out = prepare_run(cfg)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    # Fail on a bad dataset root before anything slow (pretrained weights, CLIP) is built.
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Plain dicts/lists (not DictConfig) reach the module, so its hyper-parameters survive Lightning's
    # weights_only checkpoint loading on resume.
    model: L.LightningModule = instantiate(cfg.model, _convert_="all")
    loggers = instantiate_group(cfg.get("logger"))
    requested = cfg.get("ckpt_path")
    resumable = False
    if requested in (None, "", "null", "last"):
        owned = ["checkpoints/*.ckpt", *csv_files(loggers, out)]
        record = training_record(cfg)
        fresh = requested != "last"
        resumable = claim(
            out, record, what="checkpoints and logs", owned=owned, overwrite=True, fresh=fresh, name=CKPT_RECORD
        )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers)
    ckpt_path = resolve_ckpt_path(requested, out / "checkpoints", resumable)
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
    return model, metrics


def csv_files(loggers: list[Any], out: Path) -> list[str]:
    """``metrics.csv`` of the CSV loggers inside ``out`` (relative): a run that starts fresh must not keep the rows
    of an earlier run there (a resumed one appends to them)."""
    dirs = [Path(lg.log_dir) for lg in loggers if isinstance(lg, CSVLogger)]
    return [str((d / "metrics.csv").relative_to(out)) for d in dirs if d.is_relative_to(out)]
