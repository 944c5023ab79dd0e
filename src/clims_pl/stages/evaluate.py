"""``clims-eval``: CAMs (threshold sweep) or label PNGs against ground truth (the scoring: :mod:`clims_pl.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from clims_pl.evaluate import (
    display_names,
    evaluate_cams,
    evaluate_label_dir,
    log_scalars,
    metrics_markdown,
    sweep_thresholds,
)
from clims_pl.io import atomic_write_json, atomic_write_text
from clims_pl.provenance import identity
from clims_pl.runtime import instantiate_group, log
from clims_pl.tables import percent


def run(cfg: DictConfig) -> dict[str, Any]:
    """``clims-eval``: CAMs of ``eval.cam_dir`` (or label PNGs of ``eval.labels``) against ``eval.split``."""
    from clims_pl.data.voc import read_split

    names = display_names(cfg.data.classes, cfg.data.get("prompts"))
    ids = read_split(cfg.data.root, cfg.eval.split)
    if cfg.eval.labels:
        label_dir = Path(cfg.eval.labels)
        name = label_dir.name
        result = evaluate_label_dir(label_dir, cfg.data.root, ids, names, progress=True)
    else:
        name = "cams"
        cam_dir = Path(cfg.eval.cam_dir)
        if not cam_dir.is_dir():
            raise FileNotFoundError(f"eval.cam_dir={cam_dir} does not exist: pass run_dir=<a clims-infer run dir>")
        sweep = cfg.eval.sweep
        grid = sweep_thresholds(sweep.start, sweep.stop, sweep.step)
        result = evaluate_cams(
            cam_dir,
            cfg.data.root,
            ids,
            grid,
            cfg.eval.threshold,
            names,
            progress=True,
            num_threads=cfg.eval.num_threads,
        )
    source = str(cfg.eval.labels or cfg.eval.cam_dir)
    # What was evaluated: the folder's provenance record (which checkpoint, which CAMs), not just its path.
    result.update(split=cfg.eval.split, gt_root=str(cfg.data.root), source=source, source_id=identity(source))
    out_dir = Path(cfg.eval.out_dir)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", metrics_markdown(result, f"{name} on {cfg.eval.split}"))
    log_scalars(instantiate_group(cfg.get("logger")), result, name)
    log.info("%s mIoU %s (written to %s)", name, percent(result["miou"]), out_dir)
    return result
