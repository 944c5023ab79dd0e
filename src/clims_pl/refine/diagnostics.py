"""Diagnostics of the refinement stages against ground truth: which step loses the points, IRN or the walk?

Evaluation only — nothing here feeds the labels. The stages write them next to their metrics (JSON + markdown)
and send the scalars to the configured loggers:

* ``ir_labels.run`` → ``metrics/ir_labels.json``: shares of confident foreground / background / unsure pixels and
  the precision of the confident ones (:func:`ir_label_diagnostics`);
* ``pseudo.run`` → ``metrics/irn_edges.json``: the IRN boundary map against ground-truth class boundaries, and the
  ``diagnostics`` key of ``metrics/pseudo.json``: the same walk with an oracle boundary map, with no boundaries and
  without any walk (:func:`pseudo_diagnostics`, from the per-image ``<pseudo.diag_dir>/<id>.npz`` the stage wrote).

Ground truth on the grid of the boundary map (stride 4 of the image it was drawn on, ×``pseudo.scale``) = the mask
resized to that grid with PIL nearest, the way IRN's training labels are reduced; its boundary cells are
:func:`clims_pl.metrics.boundary_cells` of that grid.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clims_pl.cams import load_cam
from clims_pl.data.imageio import read_label_png
from clims_pl.data.transforms import pil_resize
from clims_pl.evaluate import ground_truth
from clims_pl.io import atomic_save_npz, atomic_write_json, atomic_write_text
from clims_pl.metrics import (
    boundary_cells,
    boundary_counts,
    boundary_scores,
    confident_confusion,
    oracle_edges,
    pair_confusion,
    summarise_confident,
    summarise_confusion,
)
from clims_pl.refine.random_walk import propagate_to_edge, walk_to_label
from clims_pl.runtime import log_metrics
from clims_pl.tables import markdown_table, percent

#: Per-image walk maps of ``<diag_dir>/<id>.npz`` (float16, (K, h, w)): IRN edges, oracle edges, no edges.
WALKS = ("walked", "oracle", "no_edge")


def evaluated_ids(eval_ids: Sequence[str], labelled: Sequence[str]) -> list[str]:
    """The evaluation split's ids that the stage labels (those with ground truth and a label), in split order."""
    labelled = set(labelled)
    return [i for i in eval_ids if i in labelled]


def gt_boundary(gt: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(gt on the (h, w) grid by PIL nearest, its boundary cells) — see the module docstring."""
    grid = pil_resize(np.asarray(gt, dtype=np.uint8), tuple(size), Image.Resampling.NEAREST)
    return grid, boundary_cells(grid)


def ir_label_diagnostics(
    label_dir: str | os.PathLike, gt_root: str | os.PathLike, ids: Sequence[str], names: Sequence[str]
) -> dict[str, Any]:
    """:func:`clims_pl.metrics.summarise_confident` of the IR labels of ``ids`` (ground-truth 255 pixels skipped)."""
    conf = np.zeros((len(names), len(names) + 1), dtype=np.int64)
    for image_id in ids:
        path = Path(label_dir) / f"{image_id}.png"
        try:
            conf += confident_confusion(read_label_png(path), ground_truth(gt_root, image_id), len(names))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    return {"num_images": len(ids), **summarise_confident(conf, names), "confusion": conf.tolist()}


def diagnostic_walks(
    cam: torch.Tensor, edge: torch.Tensor, gt: np.ndarray, radius: int, beta: float, exp_times: int
) -> dict[str, torch.Tensor]:
    """The walk of the (K, h, w) CAMs with the oracle boundary map (1 on the one-sided ground-truth boundary of
    :func:`~clims_pl.metrics.oracle_edges`, else 0) and with no boundaries (0 everywhere), same settings as the
    pseudo labels; on ``edge``'s device."""
    oracle = torch.from_numpy(oracle_edges(gt_boundary(gt, edge.shape)[0])).to(edge)
    cam = cam.to(edge)
    if len(cam) == 0:
        return {"oracle": cam, "no_edge": cam}
    return {
        name: propagate_to_edge(cam, e, radius=radius, beta=beta, exp_times=exp_times)
        for name, e in (("oracle", oracle), ("no_edge", torch.zeros_like(edge)))
    }


def save_diag(path: str | os.PathLike, keys: np.ndarray, edge: torch.Tensor, walks: dict[str, torch.Tensor]) -> None:
    """``<id>.npz``: ``keys``, ``edge`` (h, w) and the maps of :data:`WALKS` (K, h, w), all float16."""
    half = {name: walks[name].to(torch.float16).cpu().numpy() for name in WALKS}
    atomic_save_npz(path, keys=np.asarray(keys, dtype=np.int64), edge=edge.to(torch.float16).cpu().numpy(), **half)


def load_diag(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of one :func:`save_diag` file, with a one-line error saying how to recompute it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in ("keys", "edge", *WALKS)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: missing or unreadable diagnostics file ({err}); delete it and rerun pseudo") from err


def pseudo_diagnostics(
    diag_dir: str | os.PathLike,
    cam_dir: str | os.PathLike,
    gt_root: str | os.PathLike,
    ids: Sequence[str],
    names: Sequence[str],
    bg_threshold: float,
    stride: int = 4,
    edge_threshold: float = 0.5,
    tolerance: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(IRN boundary-map quality, walk variants' label scores) over ``ids``, from the stage's diagnostics files.

    Boundary map: predicted boundary = edge > ``edge_threshold``; precision / recall / F against the ground-truth
    boundary cells within ``tolerance`` cells; mean edge value on object interiors (foreground cells off the
    boundary), on the boundary, and on the background interior. Walk variants, labelled exactly like the pseudo
    labels (``walk_to_label`` with ``bg_threshold``): ``oracle_edge``, ``no_edge`` and ``no_walk`` (the stride-4
    CAMs of ``cam_dir`` themselves). ``stride``: image pixels per cell of the boundary map and walked maps (4, or
    2 with ``pseudo.scale=2``); the boundary tolerance is in those cells.
    """
    num = len(names)
    variants = {"no_walk": "cam", "no_edge": "no_edge", "oracle_edge": "oracle"}
    confs = {v: np.zeros((num, num), dtype=np.int64) for v in variants}
    counts, edge_sum, cells = np.zeros(4, dtype=np.int64), np.zeros(3), np.zeros(3, dtype=np.int64)
    for image_id in ids:
        diag = load_diag(Path(diag_dir) / f"{image_id}.npz")
        diag["cam"] = load_cam(Path(cam_dir) / f"{image_id}.npz")["cam"]
        gt = ground_truth(gt_root, image_id)
        for variant, key in variants.items():
            maps = torch.from_numpy(diag[key].astype(np.float32))
            label = walk_to_label(maps, diag["keys"], gt.shape, bg_threshold, 4 if key == "cam" else stride)
            confs[variant] += pair_confusion(label, gt, num)
        edge = diag["edge"].astype(np.float64)
        grid, boundary = gt_boundary(gt, edge.shape)
        counts += boundary_counts(edge > edge_threshold, boundary, tolerance)
        regions = (~boundary & (grid > 0), boundary, ~boundary & (grid == 0))  # 255 cells are boundary cells
        edge_sum += [edge[r].sum() for r in regions]
        cells += [r.sum() for r in regions]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = edge_sum / cells
    edges = {
        "num_images": len(ids),
        "edge_threshold": edge_threshold,
        "tolerance_cells": tolerance,
        "cell_px": stride,
        **boundary_scores(counts),
        "mean_edge": {
            r: (None if c == 0 else float(m))
            for r, m, c in zip(("object_interior", "boundary", "background"), means, cells, strict=True)
        },
        "counts": dict(zip(("pred_matched", "pred", "gt_matched", "gt"), counts.tolist(), strict=True)),
    }
    walks = {}
    for variant, conf in confs.items():
        summary = summarise_confusion(conf, names)
        walks[variant] = {k: summary[k] for k in ("miou", "fg_precision", "fg_recall", "among_predfg_bg")}
    return edges, walks


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ir_labels_markdown(result: dict[str, Any], title: str) -> str:
    """Headline shares and precisions (%), then one row per class."""
    frac = result["fraction"]
    rows = [
        [
            "confident foreground / background / unsure pixels",
            f"{percent(frac['foreground'])} / {percent(frac['background'])} / {percent(frac['unsure'])}",
        ],
        ["precision of the confident foreground (label = gt class)", percent(result["fg_precision"])],
        ["precision of the confident background", percent(result["bg_precision"])],
        [
            "recall: gt foreground / background pixels labelled right",
            f"{percent(result['fg_recall'])} / {percent(result['bg_recall'])}",
        ],
        ["images", result["num_images"]],
    ]
    per_class = [[n, percent(v["fraction"]), percent(v["precision"])] for n, v in result["per_class"].items()]
    lines = [f"# {title}", "", *markdown_table(["metric", "value (%)"], rows), ""]
    return "\n".join(lines + markdown_table(["class", "share of pixels (%)", "precision (%)"], per_class)) + "\n"


def edges_markdown(result: dict[str, Any], title: str) -> str:
    mean = result["mean_edge"]
    lines = [
        f"# {title}",
        "",
        f"Predicted boundary: edge > {result['edge_threshold']}; matched within {result['tolerance_cells']} "
        f"cell(s) of the boundary map ({result['cell_px']} image px each) of a ground-truth class boundary.",
        "",
    ]
    rows = [
        [
            "boundary precision / recall / F (%)",
            f"{percent(result['precision'])} / {percent(result['recall'])} / {percent(result['f'])}",
        ],
        [
            "mean edge: object interior / true boundary / background",
            f"{_num(mean['object_interior'])} / {_num(mean['boundary'])} / {_num(mean['background'])}",
        ],
        ["images", result["num_images"]],
    ]
    return "\n".join(lines + markdown_table(["metric", "value"], rows)) + "\n"


def walks_markdown(walks: dict[str, Any], irn_miou: float | None) -> str:
    """The walk variants beside the pseudo labels' own score (IRN edges)."""
    rows = [("no walk (CAMs upsampled)", walks["no_walk"]), ("walk, no edges", walks["no_edge"])]
    rows += [("walk, IRN edges (the pseudo labels)", {"miou": irn_miou}), ("walk, oracle edges", walks["oracle_edge"])]
    header = ["labels", "mIoU (%)", "fg precision (%)", "fg recall (%)"]
    cells = [[n, percent(r["miou"]), percent(r.get("fg_precision")), percent(r.get("fg_recall"))] for n, r in rows]
    return "\n".join(["## Diagnostics (never used to make labels)", "", *markdown_table(header, cells)]) + "\n"


def flat_scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numbers of a nested result as ``prefix/a/b`` scalars (lists and None left out), for the loggers."""
    out: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def write_diagnostics(
    json_path: str | os.PathLike, result: dict[str, Any], markdown: str, loggers: Sequence[Any], prefix: str
) -> None:
    """``result`` to ``json_path``, ``markdown`` beside it (``.md``), its scalars to ``loggers``."""
    json_path = Path(json_path)
    atomic_write_json(json_path, result)
    atomic_write_text(json_path.with_suffix(".md"), markdown)
    log_metrics(list(loggers), flat_scalars(result, prefix))
