"""What every stage does at start: show and save the config, seed, build loggers and callbacks from config."""

from __future__ import annotations

import csv
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import rich
import rich.syntax
import rich.tree
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_write_text

log = logging.getLogger("clims_pl")


def prepare_run(cfg: DictConfig) -> Path:
    """Resolve and save ``cfg`` to ``<output_dir>/config.yaml``, print it (if ``print_config``), seed; return the dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_text(out / "config.yaml", text)
    if cfg.get("print_config", True):
        tree = rich.tree.Tree(f"config → {out / 'config.yaml'}", guide_style="dim")
        for key, value in cfg.items():
            body = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
            tree.add(str(key)).add(rich.syntax.Syntax(body, "yaml"))
        rich.print(tree)
    apply_runtime(cfg)
    # FixedBN keeps BatchNorm layers in eval mode on purpose (docs/reference.md#resnet-50-with-fixedbn); Lightning's warning about it misleads.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Lightning's own use of a torch API it deprecated (pytorch/utilities/_pytree.py); nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    return out


def apply_runtime(cfg: DictConfig) -> None:
    """Set the numerics of ``cfg.runtime`` before a stage computes: ``tf32`` switches TF32 for CUDA matmuls and
    cuDNN convolutions together (quirk docs/reference.md#q11-tf32; PyTorch's own defaults differ between the two: fp32 / TF32)."""
    tf32 = bool(OmegaConf.select(cfg, "runtime.tf32", default=False))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


#: What every launch writes before doing any work: Hydra's ``.hydra/`` and job log, and ``config.yaml``.
BOOKKEEPING = (".hydra", "config.yaml")


def remove_unused_run_dir(folder: Path) -> bool:
    """Delete the run folder of a failed launch if it holds nothing but BOOKKEEPING and logs, so failed attempts
    leave no empty timestamped folders behind; a folder with any result (or a resumed old run) is kept."""
    if not folder.is_dir() or any(p.name not in BOOKKEEPING and p.suffix != ".log" for p in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a dict-of-objects group (callbacks, logger); empty if absent."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def log_metrics(
    loggers: Sequence[Logger], metrics: dict[str, float], step: int | None = None, finalize: bool = False
) -> None:
    """Send stage metrics (mIoU, thresholds ...) to every configured logger and save them; ``finalize`` closes the
    loggers too (a stage that logs once; one that logs several results keeps them open)."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
        if finalize:
            logger.finalize("success")


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        self._continue = self._fs.isfile(self.metrics_file_path)

    def save(self) -> None:
        """Before the first rows of a resumed run: drop the old rows from the step it resumed at on (logged after
        its checkpoint, now logged again), keep the earlier ones."""
        if self._continue and self.metrics:
            self._continue = False
            first = min(row["step"] for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                keys, rows = list(reader.fieldnames or []), [r for r in reader if float(r["step"]) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            self.metrics_keys = keys
        super().save()


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` survives a resume: rows logged before the checkpoint are kept, rows after it
    are replaced by the resumed run's. A fresh start deletes the file first (``clims_pl.stages.train.run``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment
