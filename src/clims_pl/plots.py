"""Figures of a pipeline run, drawn from the metrics files its stages wrote (nothing is recomputed here).

* ``sweep_figure``: CAM mIoU against the background threshold, one curve per evaluation (``metrics/cams.json``
  ``sweep``), the best threshold marked; the baseline and CLIMS CAMs of one run, or every job of an ablation.
* ``class_iou_figure``: per-class IoU bars, one bar group per class and one bar per stage.
* ``wall_time_figure``: wall time of every stage (``manifest.json`` ``wall_s``).

``run_figures`` writes the three for a pipeline run folder (the report stage puts them beside ``report.md``).
Figures are built with matplotlib's object API (``Figure``: the Agg canvas, no pyplot state, no display needed)
and written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from clims_pl.io import atomic_write_bytes

SWEEP_PNG = "cam_sweep.png"
CLASS_IOU_PNG = "class_iou.png"
WALL_TIME_PNG = "wall_times.png"
DEMO_PNG = "demo.png"


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG bytes, then write them atomically (a killed run leaves no half-written figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _draw_sweep(ax: Any, curves: Mapping[str, Mapping[str, Any]], title: str) -> None:
    for label, result in curves.items():
        sweep = result["sweep"]
        points = [(t, 100 * m) for t, m in zip(sweep["threshold"], sweep["miou"], strict=True) if m is not None]
        (line,) = ax.plot(*zip(*points, strict=True), label=label)
        if result.get("best_miou") is not None:
            ax.plot(result["best_threshold"], 100 * result["best_miou"], "o", color=line.get_color())
    reported = {r["threshold"] for r in curves.values() if r.get("threshold") is not None}
    for threshold in reported:
        ax.axvline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="background threshold", ylabel="CAM mIoU (%)", title=title or "CAM threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def sweep_figure(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """``curves``: label → a CAM evaluation result (``sweep.threshold``, ``sweep.miou`` fractions, ``best_threshold``,
    ``best_miou``, ``threshold``); mIoU is drawn in %, the best threshold as a dot, the reported one as a line."""
    fig = Figure(figsize=(6.4, 4.0))
    _draw_sweep(fig.add_subplot(), curves, title)
    return save_png(fig, path)


def demo_figure(
    curves: Mapping[str, Mapping[str, Any]], panels: Mapping[str, str | os.PathLike], path: str | os.PathLike
) -> Path:
    """The demo at a glance: the threshold sweeps of the baseline and CLIMS CAMs above one overlay panel each
    (``panels``: label → a panel PNG of clims_pl.viz, the same image for every label)."""
    fig = Figure(figsize=(9.6, 3.2 + 2.4 * len(panels)), layout="constrained")
    grid = fig.add_gridspec(1 + len(panels), 1, height_ratios=[1.3] + [1.0] * len(panels))
    _draw_sweep(fig.add_subplot(grid[0]), curves, "CAM mIoU against the background threshold")
    for row, (label, panel) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(grid[row])
        with Image.open(panel) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_axis_off()
        ax.set_title(label, loc="left", fontsize="medium")
    return save_png(fig, path)


def class_iou_figure(
    stages: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike, title: str = ""
) -> Path:
    """``stages``: stage label → {class name: IoU fraction or None (class absent)}; bars in %, classes in the order
    of the first stage (absent classes leave a gap)."""
    classes = list(dict.fromkeys(name for ious in stages.values() for name in ious))
    width = 0.8 / max(len(stages), 1)
    fig = Figure(figsize=(max(6.4, 0.5 * len(classes) * max(1, len(stages) / 2)), 4.0))
    ax = fig.add_subplot()
    for i, (label, ious) in enumerate(stages.items()):
        values = [100 * v if (v := ious.get(name)) is not None else 0.0 for name in classes]
        ax.bar([c + (i - (len(stages) - 1) / 2) * width for c in range(len(classes))], values, width, label=label)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title=title or "per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


def wall_time_figure(times: Sequence[tuple[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """``times``: (stage, wall seconds) in run order; horizontal bars, minutes."""
    fig = Figure(figsize=(6.4, 0.35 * len(times) + 1.2))
    ax = fig.add_subplot()
    ax.barh([name for name, _ in times], [wall / 60 for _, wall in times])
    ax.invert_yaxis()
    ax.set(xlabel="wall time (min)", title=title or "stage wall times")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def stage_class_iou(stage_dir: Path, names: Sequence[str] = ()) -> dict[str, dict[str, float | None]]:
    """Per-class IoU of every metrics file of a stage folder: ``cams.json`` / label evaluations (``iou``, in the
    order of their ``class_names``) and ``seg_val.json`` (``plain`` / ``crf`` ``class_iou`` lists, which carry no
    names: ``names`` when that many, else class indices)."""
    out: dict[str, dict[str, float | None]] = {}
    for path in sorted((stage_dir / "metrics").glob("*.json")):
        result = json.loads(path.read_text())
        if isinstance(result.get("iou"), dict):
            order = [n for n in result.get("class_names", []) if n in result["iou"]] or list(result["iou"])
            label = stage_dir.name if stage_dir.name not in out else f"{stage_dir.name} ({path.stem})"
            out[label] = {n: result["iou"][n] for n in order}
        for variant in ("plain", "crf"):
            ious = (result.get(variant) or {}).get("class_iou") if isinstance(result.get(variant), dict) else None
            if ious:
                labels = list(names) if len(names) == len(ious) else [str(i) for i in range(len(ious))]
                out[f"{stage_dir.name} ({variant})"] = dict(zip(labels, ious, strict=True))
    return out


def class_names(run_dir: Path) -> list[str]:
    """The class names (background first) an evaluation of ``run_dir`` recorded; empty when none did."""
    for path in sorted(run_dir.glob("*/metrics/*.json")):
        names = json.loads(path.read_text()).get("class_names")
        if names:
            return [str(n) for n in names]
    return []


def cam_sweeps(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Stage name → its CAM evaluation (``<stage>/metrics/cams.json`` with a sweep), in stage-folder order."""
    out = {}
    for path in sorted(run_dir.glob("*/metrics/cams.json")):
        result = json.loads(path.read_text())
        if result.get("sweep"):
            out[path.parent.parent.name] = result
    return out


def run_figures(run_dir: Path, out_dir: Path, times: Sequence[tuple[str, float]]) -> dict[str, Path]:
    """The figures of pipeline run ``run_dir`` that its files allow, into ``out_dir``: caption → PNG path."""
    written: dict[str, Path] = {}
    sweeps = cam_sweeps(run_dir)
    if sweeps:
        written["CAM threshold sweep"] = sweep_figure(sweeps, out_dir / SWEEP_PNG)
    order = [name for name, _ in times]
    stages = sorted(
        (p for p in run_dir.iterdir() if p.is_dir()),
        key=lambda p: (p.name not in order, order.index(p.name) if p.name in order else 0, p.name),
    )
    names = class_names(run_dir)
    ious = {k: v for stage in stages for k, v in stage_class_iou(stage, names).items()}
    if ious:
        written["per-class IoU per stage"] = class_iou_figure(ious, out_dir / CLASS_IOU_PNG)
    if times:
        written["stage wall times"] = wall_time_figure(times, out_dir / WALL_TIME_PNG)
    return written


def figures_markdown(figures: Mapping[str, Path], beside: Path) -> str:
    """Markdown image links (relative to the folder of the document ``beside``) for ``figures``."""
    if not figures:
        return ""
    lines = ["", "## Figures", ""]
    lines += [f"![{caption}]({os.path.relpath(path, beside.parent)})" for caption, path in figures.items()]
    return "\n".join(lines) + "\n"


def demo_figure_of_run(
    run_dir: Path, out: Path, baseline: str = "eval_cam", clims: str = "eval_clims", overlays: Path | None = None
) -> Path:
    """``demo_figure`` of a finished demo run (``clims-demo``; stage names as conf/demo.yaml): the two evaluations'
    ``metrics/cams.json`` and the first image's panels in ``overlays`` (default ``<run_dir>/demo/overlays``)
    ``/baseline`` and ``/clims``."""
    overlays = overlays or run_dir / "demo" / "overlays"
    curves, panels = {}, {}
    for label, stage, tag in (("baseline CAM", baseline, "baseline"), ("CLIMS", clims, "clims")):
        metrics = run_dir / stage / "metrics" / "cams.json"
        first = sorted((overlays / tag).glob("*.png"))[:1]
        if not metrics.is_file() or not first:
            raise FileNotFoundError(f"{metrics} or {overlays / tag}/*.png missing: run the demo first (make demo)")
        curves[label] = json.loads(metrics.read_text())
        panels[f"{label}: {first[0].stem}"] = first[0]
    return demo_figure(curves, panels, out)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m clims_pl.plots RUN_DIR OUT.png`` (``make demo-figure``): redraw the demo figure of a demo run."""
    parser = argparse.ArgumentParser(prog="python -m clims_pl.plots", description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="the demo's run folder, e.g. runs/toy_demo")
    parser.add_argument("out", type=Path, help="where the PNG goes, e.g. docs/img/demo.png")
    args = parser.parse_args(argv)
    try:
        print(demo_figure_of_run(args.run_dir, args.out))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
