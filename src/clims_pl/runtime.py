"""What every stage does at start: show and save the config, seed, build loggers and callbacks from config."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import rich
import rich.syntax
import rich.tree
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
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
    # FixedBN keeps BatchNorm layers in eval mode on purpose (reference §2.1); Lightning's warning about it misleads.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    return out


def apply_runtime(cfg: DictConfig) -> None:
    """Set the numerics of ``cfg.runtime`` before a stage computes: ``tf32`` switches TF32 for CUDA matmuls and
    cuDNN convolutions together (quirk Q11; PyTorch's own defaults differ between the two: fp32 / TF32)."""
    tf32 = bool(OmegaConf.select(cfg, "runtime.tf32", default=False))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a dict-of-objects group (callbacks, logger); empty if absent."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def log_metrics(loggers: list[Logger], metrics: dict[str, float], step: int | None = None) -> None:
    """Send stage metrics (mIoU, thresholds ...) to every configured logger and finalise them."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
