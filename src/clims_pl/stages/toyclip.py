"""``clims-toyclip``: train (or reuse) the toy world's CLIP and evaluate it (the model and data: :mod:`clims_pl.toyclip`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_write_json
from clims_pl.runtime import log, prepare_run
from clims_pl.toyclip import ensure_toyclip, evaluate_toyclip


def _eval_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.eval, resolve=True)


def _cached_metrics(cfg: DictConfig, record: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics file of this very checkpoint and eval config, if present: a cache hit then costs no eval
    (the evaluation takes ~30 s of the demo's 15-minute budget)."""
    path = Path(cfg.metrics)
    if record["trained"] or not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    training = metrics.get("training", {})
    same = (training.get("config_hash"), training.get("checkpoint"), metrics.get("eval_config")) == (
        record["config_hash"],
        record["checkpoint"],
        _eval_config(cfg),
    )
    if same:
        log.info("toyclip: metrics of this checkpoint read from %s: not re-evaluating", path)
    return {**metrics, "training": record} if same else None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or reuse) the toy CLIP, evaluate it, write ``cfg.metrics`` and return the metrics."""
    out = prepare_run(cfg)
    if cfg.train.get("num_threads"):
        torch.set_num_threads(int(cfg.train.num_threads))
    record = ensure_toyclip(cfg)
    metrics = _cached_metrics(cfg, record)
    if metrics is None:
        metrics = {**evaluate_toyclip(cfg, record["checkpoint"]), "training": record, "eval_config": _eval_config(cfg)}
    atomic_write_json(cfg.metrics, metrics)
    atomic_write_json(out / "toyclip_metrics.json", metrics)
    sims = metrics["sims"]
    log.info(
        "toyclip %s: objects alone %.1f%%, scenes %.1f%%, backgrounds %.1f%%; cos(fg crop, class) median %.3f "
        "[p05 %.3f], cos(bg crop, class) median %.3f [p95 %.3f]; metrics → %s",
        record["checkpoint"],
        100 * metrics["object_alone_acc"],
        100 * metrics["scene_object_acc"],
        100 * metrics["background_acc"],
        sims["fg_crop_vs_own_class"]["median"],
        sims["fg_crop_vs_own_class"]["p05"],
        sims["bg_crop_vs_own_class"]["median"],
        sims["bg_crop_vs_own_class"]["p95"],
        cfg.metrics,
    )
    return metrics
