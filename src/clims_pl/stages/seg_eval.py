"""DeepLab evaluation and test export (docs/reference.md#deeplab-test-and-crf: ``main_v2.py test`` / ``crf``, ``eval.py``).

The network (eval mode: MSC max over scales 1, 0.5, 0.75, no flip) runs on the device; its stride-8 logits go to
CPU worker processes that upsample them (bilinear), take the softmax argmax and, with the dense CRF (unary
−log p, Gaussian 1/3, bilateral 67/3/4, 10 iterations), the refined argmax. Validation scores both with the
reference ``scores()`` (mIoU over classes present in the ground truth); the test split is written as VOC
palette PNGs in ``results/VOC2012/Segmentation/comp5_test_cls/`` and archived as ``results.tar.gz``. The first
``seg_eval.save_val`` validation predictions are kept for the dashboards: palette PNGs in ``seg_val/{plain,crf}/``
and panels image | prediction | CRF prediction | ground truth in ``overlays/seg_val/`` (``clims_pl.dashboard``
logs a stage's ``overlays/``).

The reference CRF sees the mean-subtracted BGR input cast to uint8, so negative values wrap around (docs/reference.md#q22-deeplab-crf-image).
``crf.reference_bug=false`` (default) gives the CRF the true RGB image; ``true`` reproduces the wrapped image.
"""

from __future__ import annotations

import logging
import multiprocessing
import tarfile
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clims_pl.config import check_number
from clims_pl.data.imageio import save_label_png
from clims_pl.data.segmentation import SegEvalDataset
from clims_pl.data.transforms import CAFFE_MEAN_BGR
from clims_pl.data.voc import load_image, load_mask, read_split
from clims_pl.io import atomic_path, atomic_write_json, pending_pngs
from clims_pl.metrics import deeplab_scores, pair_confusion
from clims_pl.models.checkpoint import load_net
from clims_pl.provenance import claim, identity
from clims_pl.refine.crf import crf_inference_prob
from clims_pl.runtime import apply_runtime, resolve_device
from clims_pl.viz import render_labels, save_panels

log = logging.getLogger("clims_pl")

#: Where the VOC evaluation server expects the segmentation results inside the archive.
RESULTS_SUBDIR = Path("results/VOC2012/Segmentation/comp5_test_cls")
#: The kept validation predictions (``plain/<id>.png``, ``crf/<id>.png``) and their panels, under ``seg_eval.out_dir``.
VAL_SUBDIR = Path("seg_val")
PANEL_SUBDIR = Path("overlays/seg_val")


def crf_image(image: np.ndarray, reference_bug: bool) -> np.ndarray:
    """The image the CRF's bilateral term sees: the RGB uint8 image, or (docs/reference.md#q22-deeplab-crf-image) the reference's mean-subtracted
    BGR float cast to uint8, negatives wrapping modulo 256 (what numpy's cast does on x86, made explicit)."""
    if not reference_bug:
        return image
    shifted = image[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR
    return (shifted.astype(np.int64) % 256).astype(np.uint8)


def segment(
    logits: np.ndarray, image: np.ndarray, crf: dict[str, Any] | None, reference_bug: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """(argmax, CRF argmax or None) at the image size from stride-8 logits (C, h, w)."""
    height, width = image.shape[:2]
    up = F.interpolate(torch.from_numpy(logits)[None], size=(height, width), mode="bilinear", align_corners=False)
    prob = F.softmax(up, dim=1)[0].numpy()
    pred = prob.argmax(axis=0).astype(np.uint8)
    if crf is None:
        return pred, None
    refined = crf_inference_prob(crf_image(image, reference_bug), prob, **crf)
    return pred, refined.argmax(axis=0).astype(np.uint8)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _score_one(
    item: tuple[str, np.ndarray],
    root: str,
    gt: str,
    crf: dict[str, Any] | None,
    reference_bug: bool,
    save: frozenset[str] = frozenset(),
    save_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Worker: confusion matrices (plain, CRF) of one validation image; its predictions as palette PNGs
    ``<save_dir>/{plain,crf}/<id>.png`` when the id is in ``save``."""
    image_id, logits = item
    mask = load_mask(root, image_id, aug=gt == "aug")
    pred, pred_crf = segment(logits, load_image(root, image_id), crf, reference_bug)
    if image_id in save:
        for kind, label in (("plain", pred), ("crf", pred_crf)):
            if label is not None:
                save_label_png(Path(save_dir) / kind / f"{image_id}.png", label)
    num_classes = logits.shape[0]
    conf_crf = None if pred_crf is None else pair_confusion(pred_crf, mask, num_classes)
    return pair_confusion(pred, mask, num_classes), conf_crf


def _export_one(
    item: tuple[str, np.ndarray], root: str, out_dir: str, crf: dict[str, Any] | None, reference_bug: bool
) -> str:
    """Worker: write one test prediction (CRF-refined when ``crf``) as a palette PNG."""
    image_id, logits = item
    pred, pred_crf = segment(logits, load_image(root, image_id), crf, reference_bug)
    save_label_png(Path(out_dir) / f"{image_id}.png", pred if pred_crf is None else pred_crf)
    return image_id


@torch.inference_mode()
def predict_logits(net: torch.nn.Module, dataset: SegEvalDataset, device: torch.device) -> Iterator[tuple]:
    """(id, stride-8 MSC-max logits as float32 numpy) per image, computed on ``device``."""
    net.eval()
    for index in range(len(dataset)):
        item = dataset[index]
        logits = net(item["image"][None].to(device))[0]
        yield item["id"], logits.float().cpu().numpy()


def _map(func: Any, items: Iterator, total: int, num_workers: int, desc: str) -> Iterator:
    """``func`` over ``items`` with a progress bar, in ``num_workers`` spawned processes (0/1: in-process)."""
    progress = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    if num_workers <= 1:
        for item in items:
            yield func(item)
            progress.update()
    else:
        context = multiprocessing.get_context("spawn")  # the parent holds CUDA / OpenMP state: never fork it
        with context.Pool(num_workers, initializer=_init_worker) as pool:
            for result in pool.imap_unordered(func, items, chunksize=1):
                yield result
                progress.update()
    progress.close()


def evaluate_val(
    net: torch.nn.Module,
    root: str,
    ids: list[str],
    *,
    gt: str = "aug",
    normalization: str = "imagenet",
    crf: dict[str, Any] | None = None,
    reference_bug: bool = False,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    save: Sequence[str] = (),
    save_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Reference ``scores()`` of the predictions on ``ids`` without and (when ``crf``) with the dense CRF; the
    predictions of the ids in ``save`` also as palette PNGs ``<save_dir>/plain/<id>.png`` (and ``crf/<id>.png``)."""
    if save and save_dir is None:
        raise ValueError("evaluate_val: save names ids to keep but save_dir is None")
    dataset = SegEvalDataset(root, ids, gt=None, normalization=normalization)
    kept = {"save": frozenset(save), "save_dir": None if save_dir is None else str(save_dir)}
    work = partial(_score_one, root=root, gt=gt, crf=crf, reference_bug=reference_bug, **kept)
    items = predict_logits(net, dataset, torch.device(device))
    conf = conf_crf = None
    for plain, refined in _map(work, items, len(ids), num_workers, "seg val"):
        conf = plain if conf is None else conf + plain
        if refined is not None:
            conf_crf = refined if conf_crf is None else conf_crf + refined
    result: dict[str, Any] = {"num_images": len(ids), "plain": deeplab_scores(conf), "confusion": conf.tolist()}
    if conf_crf is not None:
        result["crf"] = deeplab_scores(conf_crf)
        result["crf_reference_bug"] = reference_bug
    return result


def export_test(
    net: torch.nn.Module,
    root: str,
    ids: list[str],
    out_dir: str | Path,
    *,
    normalization: str = "imagenet",
    crf: dict[str, Any] | None = None,
    reference_bug: bool = False,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Path:
    """Palette PNGs of ``ids`` in ``<out_dir>/results/VOC2012/Segmentation/comp5_test_cls/`` (existing ones are
    kept) and ``<out_dir>/results.tar.gz`` holding that ``results/`` tree, ready for the evaluation server."""
    png_dir = Path(out_dir) / RESULTS_SUBDIR
    todo = pending_pngs(ids, png_dir)
    dataset = SegEvalDataset(root, todo, gt=None, normalization=normalization)
    work = partial(_export_one, root=root, out_dir=str(png_dir), crf=crf, reference_bug=reference_bug)
    for _ in _map(work, predict_logits(net, dataset, torch.device(device)), len(todo), num_workers, "seg test"):
        pass
    archive = Path(out_dir) / "results.tar.gz"
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for image_id in ids:
            tar.add(png_dir / f"{image_id}.png", arcname=str(RESULTS_SUBDIR / f"{image_id}.png"))
    return archive


def claim_val_outputs(out_dir: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """``(<out_dir>/seg_val, <out_dir>/overlays/seg_val)`` holding only outputs of ``record``: validation is
    recomputed on every run, so predictions and panels of other inputs or another ``save_val`` are cleared (nothing
    is created when ``record`` keeps no ids and neither folder exists)."""
    val_dir, panel_dir = out_dir / VAL_SUBDIR, out_dir / PANEL_SUBDIR
    if record["ids"] or val_dir.exists() or panel_dir.exists():
        claim(val_dir, record, what="val predictions", owned=("plain/*.png", "crf/*.png"), overwrite=True)
        claim(panel_dir, record, what="val prediction panels", owned=("*.png",), overwrite=True)
    return val_dir, panel_dir


def save_val_panels(root: str, ids: Sequence[str], val_dir: Path, panel_dir: Path, crf: bool) -> list[Path]:
    """``<panel_dir>/<id>.png``: image | prediction | CRF prediction (when ``crf``) | ground truth."""
    titles = {"prediction": val_dir / "plain", **({"CRF prediction": val_dir / "crf"} if crf else {})}
    return save_panels(ids, panel_dir, lambda image_id: render_labels(titles, root, image_id))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Val mIoU (plain and CRF) to ``seg_eval.metrics_path`` and the first ``seg_eval.save_val`` predictions
    (``VAL_SUBDIR``, ``PANEL_SUBDIR``); test-split PNGs + tar.gz when ``seg_eval.test_split``.

    Reads ``ckpt`` (DeepLab checkpoint of clims-train experiment=..._seg), ``model.net`` (its DeepLabV2 config),
    ``data.root`` and the ``seg_eval`` section.
    """
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ValueError("ckpt is required: the DeepLab checkpoint, e.g. ckpt=<seg run>/checkpoints/last.ckpt")
    apply_runtime(cfg)
    stage = cfg.seg_eval
    root, device = str(cfg.data.root), resolve_device(stage.device)
    net = load_net(cfg.model.net, cfg.ckpt).to(device)
    crf = OmegaConf.to_container(stage.crf.params, resolve=True) if stage.crf.enabled else None
    options = {
        "normalization": net.input_normalization,  # what the trunk's weights expect (model.net.trunk)
        "crf": crf,
        "reference_bug": bool(stage.crf.reference_bug),
        "device": device,
        "num_workers": int(stage.num_workers),
    }
    inputs = {
        "ckpt": identity(cfg.ckpt),
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
        **{k: v for k, v in options.items() if k not in ("device", "num_workers")},
    }
    out_dir = Path(stage.out_dir)
    start = time.time()
    result: dict[str, Any] = {}
    if stage.val_split:
        ids = read_split(root, stage.val_split)
        shown = ids[: check_number("seg_eval.save_val", stage.save_val, integer=True, ge=0)]
        val_dir, panel_dir = claim_val_outputs(out_dir, {**inputs, "split": stage.val_split, "ids": shown})
        result = evaluate_val(net, root, ids, gt=stage.val_gt, save=shown, save_dir=val_dir, **options)
        save_val_panels(root, shown, val_dir, panel_dir, crf is not None)
        result["split"] = stage.val_split
        atomic_write_json(stage.metrics_path, result)
        crf_miou = result.get("crf", {}).get("miou")
        log.info("DeepLab %s mIoU %s, with CRF %s", stage.val_split, result["plain"]["miou"], crf_miou)
    if stage.test_split:
        record = {**inputs, "split": stage.test_split}
        png_dir = out_dir / RESULTS_SUBDIR
        claim(png_dir, record, what="test predictions", owned=("*.png",), overwrite=bool(cfg.get("overwrite")))
        archive = export_test(net, root, read_split(root, stage.test_split), out_dir, **options)
        result["test_archive"] = str(archive)
        log.info("test predictions archived in %s", archive)
    result["wall_s"] = time.time() - start
    return result
