"""``clims-reproduce`` / ``clims-demo``: an experiment's stages in order (:mod:`clims_pl.pipeline`); with
``preflight=true`` the same stages in miniature first (:mod:`clims_pl.preflight`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from clims_pl import pipeline
from clims_pl.preflight import run_preflight


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every stage's manifest: of the preflight's miniature run when ``preflight=true``, else of the real run."""
    if cfg.get("preflight"):
        return run_preflight(cfg)
    return pipeline.run(cfg)


def run_scored(cfg: DictConfig) -> float | None:
    """``run`` whose return value is ``pipeline.objective``: the entry an optimising sweeper (``+hparams_search=...``)
    needs (Hydra's Optuna sweeper reads the task's return value)."""
    return pipeline.objective(cfg, run(cfg))
