"""``clims-viz``: overlay panels for eyeballing a run (the drawing: :mod:`clims_pl.viz`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clims_pl.evaluate import display_names
from clims_pl.runtime import instantiate_group, log
from clims_pl.viz import pick_ids, write_overlays, write_refinement_overlays


def run(cfg: DictConfig) -> list[Path]:
    """``clims-viz``: overlay panels of ``viz.ids`` (or ``viz.n`` random ids) into ``viz.out_dir``."""
    from lightning.pytorch.loggers import WandbLogger

    names = display_names(cfg.data.classes, cfg.data.get("prompts"))
    viz, given = cfg.viz, list(cfg.viz.ids) if cfg.viz.ids else None
    refine = viz.get("refinement") or {}
    style = {"alpha": viz.alpha, "cmap": viz.cmap, "max_side": viz.max_side}
    if refine.get("diag_dir"):
        missing = [k for k in ("ir_label_dir", "pseudo_dir") if not refine.get(k)]
        if missing:
            raise ValueError(f"viz.refinement.diag_dir is set: also set viz.refinement.{' and '.join(missing)}")
        fix = "run the pseudo stage with pseudo.diagnostics=true (it stores them for its eval_split)"
        ids = pick_ids(refine.diag_dir, given, viz.n, viz.seed, what="pseudo diagnostics", fix=fix)
        dirs = {"cams": viz.cam_dir, "ir_labels": refine.ir_label_dir, "pseudo": refine.pseudo_dir}
        paths = write_refinement_overlays({**dirs, "diag": refine.diag_dir}, cfg.data.root, ids, viz.out_dir, **style)
    else:
        fix = "pass run_dir=<a clims-infer run dir>" if not given else "run clims-infer on them"
        ids = pick_ids(viz.cam_dir, given, viz.n, viz.seed, fix=fix)
        paths = write_overlays(viz.cam_dir, cfg.data.root, ids, viz.out_dir, names, threshold=viz.threshold, **style)
    for logger in instantiate_group(cfg.get("logger")):
        if isinstance(logger, WandbLogger):
            for image_id, path in zip(ids, paths, strict=True):  # one key each: panel sizes differ
                logger.log_image(key=f"overlays/{image_id}", images=[str(path)], caption=[image_id])
            logger.finalize("success")
    log.info("wrote %d overlays to %s", len(paths), viz.out_dir)
    return paths
