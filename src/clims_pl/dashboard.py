"""What a stage wrote, on the dashboards: every stage's numbers, curves and pictures in the configured logger(s).

``publish(stage, stage_dir, cfg)`` runs after a pipeline stage finished (``clims_pl.pipeline``) and reads only its
files, so every stage reaches the logger the same way, Lightning training or not:

* headline numbers and diagnostics: every number of ``<stage_dir>/metrics/*.json`` as a scalar
  ``<stage>/<file>/<key path>`` (step 0; on wandb also the run summary, so the project table shows them as columns);
* per-class IoU as a table ``<stage>/class_iou`` (wandb Table; TensorBoard text; CSV: the scalars);
* the CAM threshold sweep of ``metrics/cams.json``: wandb line plot ``<stage>/sweep``; TensorBoard / CSV scalars
  ``<stage>/sweep/miou`` and ``<stage>/sweep/threshold`` with step = index in the sweep;
* ``dashboard.images`` (default ``DEFAULT_IMAGES``) overlay panels next to the ground truth, first ids in order: the
  stage's CAMs (``cams/``), IR labels (``ir_labels/``), pseudo labels (``pseudo/``) and the panels it drew itself
  (``overlays/``), also written to ``<stage_dir>/dashboard/images/``; and every figure ``<stage_dir>/*.png`` (the
  report's and the demo's);
* the stage's resolved config and the Hydra overrides of the pipeline job (the swept values of a multirun) as
  hyperparameters (wandb run config).

Loggers come from the stage's ``logger`` group (``runtime.instantiate_group``), with ``save_dir`` moved to
``<stage_dir>/dashboard`` so a training stage's own ``csv/`` and ``tensorboard/`` files are never rewritten. On wandb
the run the stage opened (a training stage's) is continued; the pipeline names each run after its stage
(``job_type`` = stage) in the pipeline's group and finishes it after ``publish``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from clims_pl.io import atomic_path
from clims_pl.plots import class_names, stage_class_iou
from clims_pl.refine.diagnostics import flat_scalars
from clims_pl.runtime import instantiate_group

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 4
#: Sub-folder of a stage folder holding what ``publish`` logged (loggers' save_dir and the panel PNGs).
DASHBOARD_DIR = "dashboard"


def stage_loggers(cfg: DictConfig, stage_dir: Path) -> list[Logger]:
    """The loggers of ``cfg.logger``, saving under ``<stage_dir>/dashboard`` (those that take a ``save_dir``)."""
    nodes = cfg.get("logger")
    if not nodes:
        return []
    moved = {
        name: {"save_dir": str(stage_dir / DASHBOARD_DIR)}
        for name, node in nodes.items()
        if isinstance(node, DictConfig) and "save_dir" in node
    }
    return instantiate_group(OmegaConf.merge(nodes, moved))


def read_metrics(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """File stem → content of every ``<stage_dir>/metrics/*.json``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((stage_dir / "metrics").glob("*.json"))}


def swept_values() -> dict[str, str]:
    """The Hydra overrides of the running job (``clims-reproduce -m``: the values this job of the sweep got)."""
    if not HydraConfig.initialized():
        return {}
    return dict(str(o).split("=", 1) for o in HydraConfig.get().overrides.task if "=" in str(o))


def _panel_ids(folder: Path, suffix: str, image_root: Path, count: int) -> list[str]:
    """The first ``count`` ids of ``folder``'s files, those with a ground-truth mask first."""
    ids = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    with_gt = list(islice((i for i in ids if (image_root / "SegmentationClass" / f"{i}.png").is_file()), count))
    shown = set(with_gt)
    return (with_gt + [i for i in ids if i not in shown])[:count]


def panel_sources(stage_dir: Path, cfg: DictConfig, count: int) -> dict[str, Callable[[], Image.Image]]:
    """Image key → a function drawing that panel, for the stage's CAM and label folders, its own overlays and
    figures (all of these, the rest ``count`` per folder)."""
    from clims_pl.evaluate import display_names
    from clims_pl.viz import render_labels, render_overlay

    out: dict[str, Callable[[], Image.Image]] = {}
    data = cfg.get("data")
    if data is not None and data.get("root") and data.get("classes"):
        root = Path(data.root)
        cam_ids = _panel_ids(stage_dir / "cams", ".npz", root, count)
        # The class names are read from the prompt bank only for a stage with CAMs (label panels need none).
        names = display_names(data.classes, data.get("prompts")) if cam_ids else []
        for image_id in cam_ids:
            out[f"cams/{image_id}"] = lambda i=image_id: render_overlay(stage_dir / "cams", root, i, names)
        for folder in ("ir_labels", "pseudo"):
            for image_id in _panel_ids(stage_dir / folder, ".png", root, count):
                out[f"{folder}/{image_id}"] = lambda f=folder, i=image_id: render_labels({f: stage_dir / f}, root, i)
    for path in sorted(stage_dir.glob("*.png")):  # the stage's figures (report, demo: clims_pl.plots)
        out[f"figures/{path.stem}"] = lambda p=path: _read_rgb(p)
    for group in sorted({p.parent for p in (stage_dir / "overlays").rglob("*.png")}):
        for path in sorted(group.glob("*.png"))[:count]:
            key = path.relative_to(stage_dir).with_suffix("").as_posix()
            out[key] = lambda p=path: _read_rgb(p)
    return out


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def write_panels(stage_dir: Path, cfg: DictConfig, count: int) -> dict[str, Path]:
    """Draw the panels of ``panel_sources`` into ``<stage_dir>/dashboard/images/<key>.png``; key → path."""
    written = {}
    for key, draw in panel_sources(stage_dir, cfg, count).items():
        path = stage_dir / DASHBOARD_DIR / "images" / f"{key}.png"
        with atomic_path(path) as tmp:
            draw().save(tmp, format="PNG")
        written[key] = path
    return written


def _log_tables(logger: Logger, stage: str, tables: dict[str, dict[str, float | None]]) -> None:
    columns = ["class", *tables]
    classes = list(dict.fromkeys(c for ious in tables.values() for c in ious))
    rows = [[c, *(ious.get(c) for ious in tables.values())] for c in classes]
    if isinstance(logger, WandbLogger):
        logger.log_table(key=f"{stage}/class_iou", columns=columns, data=rows)
    elif isinstance(logger, TensorBoardLogger):
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows]
        logger.experiment.add_text(f"{stage}/class_iou", "\n".join(lines), global_step=0)


def _log_sweep(logger: Logger, stage: str, sweep: dict[str, list]) -> None:
    points = [(t, m) for t, m in zip(sweep["threshold"], sweep["miou"], strict=True) if m is not None]
    if isinstance(logger, WandbLogger):
        import wandb

        table = wandb.Table(columns=["threshold", "miou"], data=[list(p) for p in points])
        title = f"{stage}: CAM mIoU against the background threshold"
        logger.experiment.log({f"{stage}/sweep": wandb.plot.line(table, "threshold", "miou", title=title)})
        return
    for step, (threshold, miou) in enumerate(points):
        logger.log_metrics({f"{stage}/sweep/threshold": threshold, f"{stage}/sweep/miou": miou}, step=step)


def _log_images(logger: Logger, stage: str, images: dict[str, Path]) -> None:
    for key, path in images.items():
        if isinstance(logger, WandbLogger):  # one key each: panel sizes differ
            logger.log_image(key=f"{stage}/images/{key}", images=[str(path)], caption=[key])
        elif isinstance(logger, TensorBoardLogger):
            pixels = np.asarray(_read_rgb(path))
            logger.experiment.add_image(f"{stage}/images/{key}", pixels, global_step=0, dataformats="HWC")


def publish(stage: str, stage_dir: str | Path, cfg: DictConfig) -> list[Logger]:
    """Log what stage ``stage`` wrote into ``stage_dir`` to the loggers of its config ``cfg``; returns them (none
    when ``cfg`` has no logger, the stage files only)."""
    stage_dir = Path(stage_dir)
    loggers = stage_loggers(cfg, stage_dir)
    if not loggers:
        return []
    results = read_metrics(stage_dir)
    scalars = {k: v for stem, result in results.items() for k, v in flat_scalars(result, f"{stage}/{stem}").items()}
    tables = stage_class_iou(stage_dir, class_names(stage_dir.parent))
    sweeps = [r["sweep"] for r in results.values() if isinstance(r.get("sweep"), dict)]
    images = write_panels(stage_dir, cfg, int(OmegaConf.select(cfg, "dashboard.images", default=DEFAULT_IMAGES)))
    params = {"stage": stage, "swept": swept_values(), "config": OmegaConf.to_container(cfg, resolve=True)}
    for logger in loggers:
        logger.log_hyperparams(params)
        # wandb keeps one step counter per run (a training stage's is past 0): its scalars go to the current step.
        logger.log_metrics(scalars, step=None if isinstance(logger, WandbLogger) else 0)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(scalars)
        if tables:
            _log_tables(logger, stage, tables)
        for sweep in sweeps:
            _log_sweep(logger, stage, sweep)
        _log_images(logger, stage, images)
        logger.save()
        logger.finalize("success")
    log.info(
        "%s: %d numbers, %d tables, %d images to %s", stage, len(scalars), len(tables), len(images), _names(loggers)
    )
    return loggers


def _names(loggers: Iterable[Logger]) -> str:
    return ", ".join(type(logger).__name__ for logger in loggers)
