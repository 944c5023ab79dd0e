"""Stage G + H, semantic pseudo labels (docs/reference.md#stage-g-random-walk, docs/reference.md#stage-h-pseudo-label-evaluation): CAMs random-walked on the IRN boundary map.

For each image: the IRN edge map of (image, flip) at full resolution, the stride-4 CAMs of ``cams/<id>.npz``
walked with the sparse transition matrix (radius 5, β = 10, 2⁸ steps), upsampled, globally normalised and
thresholded against a background plane of 0.2. With ``pseudo.scale`` ≠ 1 (a toy setting, docs/toy_world.md) the
edge map is made on the image resized by that factor and the CAMs are resized bilinearly to its stride-4 grid.
Labels go to ``<out_dir>/<id>.png`` (atomic, resumable); then they are evaluated on the evaluation split like the CAMs (``metrics/pseudo.json``). With ``pseudo.diagnostics``
the evaluation images also get ``<diag_dir>/<id>.npz`` (boundary map, walked maps, the oracle-edge and no-edge walks)
and the stage writes the diagnostics of ``clims_pl.refine.diagnostics`` (``metrics/irn_edges.json``, and
``diagnostics`` in ``metrics/pseudo.json``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clims_pl.cams import load_cam, strided_size
from clims_pl.config import check_number
from clims_pl.data.imageio import save_label_png
from clims_pl.data.segmentation import to_tensor
from clims_pl.data.transforms import imagenet_normalize, pil_resize
from clims_pl.data.voc import load_image, read_split
from clims_pl.evaluate import display_names, evaluate_label_dir, ground_truth, metrics_markdown
from clims_pl.io import pending_pngs
from clims_pl.models.checkpoint import load_net
from clims_pl.models.irn import IRNet
from clims_pl.provenance import claim, identity
from clims_pl.refine.diagnostics import (
    diagnostic_walks,
    edges_markdown,
    evaluated_ids,
    pseudo_diagnostics,
    save_diag,
    walks_markdown,
    write_diagnostics,
)
from clims_pl.refine.random_walk import propagate_to_edge, walk_to_label
from clims_pl.runtime import apply_runtime, instantiate_group, resolve_device

log = logging.getLogger("clims_pl")


class PseudoLabelInputs(Dataset):
    """Per id: the ImageNet-normalised (image, h-flip) pair (2, 3, H, W), the CAM file's keys and its stride-4 cam,
    and the image size (H, W).

    With ``scale`` ≠ 1 the image is resized to (round(H·s), round(W·s)) (PIL bicubic, as the multi-scale CAM
    inference) and the cam bilinearly to that image's stride-4 grid, where the IRN edge map will be.
    """

    def __init__(self, root: str | os.PathLike, ids: list[str], cam_dir: str | os.PathLike, scale: float = 1.0) -> None:
        self.root, self.ids, self.cam_dir, self.scale = Path(root), ids, Path(cam_dir), scale

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        rgb = load_image(self.root, image_id)
        cams = load_cam(self.cam_dir / f"{image_id}.npz")
        if cams["high_res"].shape[1:] != rgb.shape[:2]:
            raise ValueError(f"{self.cam_dir / image_id}.npz: CAM size {cams['high_res'].shape[1:]} is not the image's")
        cam = torch.from_numpy(cams["cam"])
        if self.scale != 1.0:
            size = (round(rgb.shape[0] * self.scale), round(rgb.shape[1] * self.scale))
            rgb = pil_resize(rgb, size, Image.Resampling.BICUBIC)
            if len(cam):
                cam = F.interpolate(cam[None], size=strided_size(size), mode="bilinear", align_corners=False)[0]
        image = to_tensor(imagenet_normalize(rgb))
        return {
            "id": image_id,
            "pair": torch.stack([image, image.flip(-1)]),
            "cam": cam,
            "keys": cams["keys"],
            "image_size": cams["high_res"].shape[1:],
        }


@torch.no_grad()
def edge_and_walk(
    net: IRNet, pair: torch.Tensor, cam: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(IRN boundary map (h, w), walked CAMs (K, h, w)) of one image from its (image, flip) pair and stride-4 CAMs.

    ``walk_to_label(walked, keys, (H, W), bg_threshold)`` makes the pseudo label (all background when K = 0).
    """
    edge = net.edge_map(pair)
    cam = cam.to(edge)
    if len(cam) == 0:
        return edge, cam
    return edge, propagate_to_edge(cam, edge, radius=radius, beta=beta, exp_times=exp_times)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write pseudo labels for ``pseudo.split`` (skipping finished ones), then evaluate ``pseudo.eval_split``.

    Reads ``ckpt`` (IRN checkpoint from clims-train experiment=..._irn), ``model.net`` (its IRNet config),
    ``data.root`` / ``data.classes`` and the ``pseudo`` section. Returns the metrics dict (also written to
    ``pseudo.metrics_path``). Labels of another checkpoint, CAMs or settings in ``pseudo.out_dir`` are refused
    unless ``overwrite=true`` (recomputes them all).
    """
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ValueError("ckpt is required: the IRN checkpoint, e.g. ckpt=<irn run>/checkpoints/last.ckpt")
    apply_runtime(cfg)
    stage = cfg.pseudo
    root, out_dir = str(cfg.data.root), Path(stage.out_dir)
    ids = read_split(root, stage.split)
    walk = {k: stage[k] for k in ("radius", "beta", "exp_times")}
    scale = float(check_number("pseudo.scale", stage.get("scale", 1.0), gt=0))
    if not (4 / scale).is_integer():
        raise ValueError(
            f"pseudo.scale={scale}: the walked maps are upsampled by 4 / scale to the image, which must be a whole "
            "number: use 1 (the reference), 2 or 4"
        )
    stride = int(4 / scale)
    record = {
        "ckpt": identity(cfg.ckpt),
        "cams": identity(stage.cam_dir),
        "images": root,
        "split": stage.split,
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
        "bg_threshold": stage.bg_threshold,
        # Recorded only when not the reference 1: folders written before the option existed still resume.
        **({"scale": scale} if scale != 1.0 else {}),
        **walk,
    }
    overwrite = bool(cfg.get("overwrite"))
    claim(out_dir, record, what="pseudo labels", owned=("*.png",), overwrite=overwrite)
    eval_ids = read_split(root, stage.eval_split)
    diag_ids = evaluated_ids(eval_ids, ids) if stage.diagnostics else []
    if diag_ids:
        claim(stage.diag_dir, record, what="walk diagnostics", owned=("*.npz",), overwrite=overwrite)
    todo = set(pending_pngs(ids, out_dir))
    diag_todo = set(pending_pngs(diag_ids, Path(stage.diag_dir), suffix=".npz")) if diag_ids else set()
    work = [i for i in ids if i in todo or i in diag_todo]
    device = resolve_device(stage.device)
    start = time.time()
    if work:
        net = load_net(cfg.model.net, cfg.ckpt).to(device)
        loader = DataLoader(
            PseudoLabelInputs(root, work, stage.cam_dir, scale), batch_size=None, num_workers=int(stage.num_workers)
        )
        for item in tqdm(loader, desc="pseudo labels", unit="img", dynamic_ncols=True):
            image_id, pair = item["id"], item["pair"].to(device)
            edge, walked = edge_and_walk(net, pair, item["cam"], **walk)
            if image_id in todo:
                label = walk_to_label(walked, item["keys"], item["image_size"], float(stage.bg_threshold), stride)
                save_label_png(out_dir / f"{image_id}.png", label)
            if image_id in diag_todo:
                walks = diagnostic_walks(item["cam"], edge, ground_truth(root, image_id), **walk)
                save_diag(Path(stage.diag_dir) / f"{image_id}.npz", item["keys"], edge, {"walked": walked, **walks})
    labelled = time.time() - start
    log.info("pseudo: wrote %d of %d labels in %.1f s -> %s", len(todo), len(ids), labelled, out_dir)
    names = display_names(cfg.data.classes, cfg.data.get("prompts"))
    result = evaluate_label_dir(out_dir, root, eval_ids, names, progress=True)
    result.update(split=stage.eval_split, written=len(todo), skipped=len(ids) - len(todo), label_s=labelled)
    loggers = instantiate_group(cfg.get("logger"))
    markdown = metrics_markdown(result, f"pseudo labels on {stage.eval_split}")
    if diag_ids:
        edges, walks = pseudo_diagnostics(
            stage.diag_dir, stage.cam_dir, root, diag_ids, names, float(stage.bg_threshold), stride
        )
        result["diagnostics"] = {**walks, "irn_edge": {"miou": result["miou"]}, "edge_f": edges["f"]}
        markdown += "\n" + walks_markdown(walks, result["miou"])
        edges_path = Path(stage.metrics_path).with_name("irn_edges.json")
        title = f"IRN boundary map on {stage.eval_split} ({len(diag_ids)} images)"
        write_diagnostics(edges_path, edges, edges_markdown(edges, title), loggers, "irn_edges")
    write_diagnostics(stage.metrics_path, result, markdown, loggers, "pseudo")
    log.info("pseudo-label mIoU on %s: %.2f", stage.eval_split, 100 * (result["miou"] or float("nan")))
    return result
