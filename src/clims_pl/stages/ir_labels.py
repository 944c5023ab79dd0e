"""Stage E, IR labels: write the confident seeds of :func:`clims_pl.refine.ir_labels.ir_label` for a split, then
score them against ground truth (``metrics/ir_labels.json`` + ``.md``, see ``clims_pl.refine.diagnostics``)."""

from __future__ import annotations

import multiprocessing
import time
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clims_pl.cams import load_cam
from clims_pl.data.imageio import save_label_png
from clims_pl.data.voc import load_image, read_split
from clims_pl.evaluate import display_names
from clims_pl.io import pending_pngs
from clims_pl.provenance import claim, identity
from clims_pl.refine.diagnostics import evaluated_ids, ir_label_diagnostics, ir_labels_markdown, write_diagnostics
from clims_pl.refine.ir_labels import ir_label
from clims_pl.runtime import instantiate_group, log


def _make_one(image_id: str, root: str, cam_dir: str, out_dir: str, params: dict[str, Any]) -> str:
    """Worker: build and atomically write one IR label PNG."""
    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    label = ir_label(load_image(root, image_id), cams["high_res"], cams["keys"], **params)
    save_label_png(Path(out_dir) / f"{image_id}.png", label)
    return image_id


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write ``<ir_labels.out_dir>/<id>.png`` for every id of ``ir_labels.split``; skip those already written.
    Then score the labels of ``ir_labels.eval_split`` (∩ split) into ``ir_labels.metrics_path`` (+ ``.md``, loggers).

    Reads ``data.root`` (images) and the ``ir_labels`` section: split, cam_dir, out_dir, fg_threshold,
    bg_threshold, num_workers, crf (pydensecrf parameters), eval_split, metrics_path. Labels of other CAMs or
    settings in ``out_dir`` are refused unless ``overwrite=true`` (recomputes them all).
    """
    stage = cfg.ir_labels
    root, out_dir = str(cfg.data.root), Path(stage.out_dir)
    ids = read_split(root, stage.split)
    params = {
        "fg_threshold": float(stage.fg_threshold),
        "bg_threshold": float(stage.bg_threshold),
        "crf": OmegaConf.to_container(stage.crf, resolve=True),
    }
    record = {"cams": identity(stage.cam_dir), "images": root, "split": stage.split, **params}
    claim(out_dir, record, what="IR labels", owned=("*.png",), overwrite=bool(cfg.get("overwrite")))
    todo = pending_pngs(ids, out_dir)
    log.info("ir_labels: %d of %d images to do -> %s", len(todo), len(ids), out_dir)
    start = time.time()
    work = partial(_make_one, root=root, cam_dir=str(stage.cam_dir), out_dir=str(out_dir), params=params)
    num_workers = min(int(stage.num_workers), len(todo))
    progress = tqdm(total=len(todo), desc="ir_labels", unit="img", dynamic_ncols=True)
    if num_workers <= 1:
        for image_id in todo:
            work(image_id)
            progress.update()
    else:
        # spawn, not fork: in the pipeline this process has already run torch (OpenMP threads, maybe CUDA).
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            for _ in pool.imap_unordered(work, todo, chunksize=4):
                progress.update()
    progress.close()
    result = {"total": len(ids), "written": len(todo), "skipped": len(ids) - len(todo), "wall_s": time.time() - start}
    eval_ids = evaluated_ids(read_split(root, stage.eval_split), ids)
    if eval_ids:
        names = display_names(cfg.data.classes, cfg.data.get("prompts"))
        diag = ir_label_diagnostics(out_dir, root, eval_ids, names)
        diag["split"] = stage.eval_split
        title = f"IR labels on {stage.eval_split} ({len(eval_ids)} images)"
        write_diagnostics(
            stage.metrics_path, diag, ir_labels_markdown(diag, title), instantiate_group(cfg.get("logger")), "ir_labels"
        )
        log.info(
            "ir_labels on %s: confident fg precision %.1f%%, bg precision %.1f%%",
            stage.eval_split,
            100 * (diag["fg_precision"] or float("nan")),
            100 * (diag["bg_precision"] or float("nan")),
        )
        result.update(fg_precision=diag["fg_precision"], bg_precision=diag["bg_precision"])
    return result
