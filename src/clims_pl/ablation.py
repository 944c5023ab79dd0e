"""One table from a sweep of pipeline runs: each job's swept settings beside its CAM mIoU (+ the toy's
co-occurring-background false-activation rate), written as ``ablation.md`` and ``ablation.csv`` in the sweep folder.

Hydra's basic sweeper runs the jobs but aggregates nothing. :class:`AblationTable` (a Hydra callback listed under
``hydra.callbacks`` by ``experiment=ablation_losses`` / ``ablation_weights`` / ``toy_ablation``) writes the table
when the multirun ends; ``python -m clims_pl.ablation <sweep dir>`` writes it again for any finished or partial sweep.

Every number is read from files the jobs wrote: a job is a folder of the sweep holding ``.hydra/`` (Hydra's job
number and task overrides) and ``config.yaml`` (the resolved pipeline config), whose evaluation stage's
``manifest.json`` holds the CAM metrics (``metrics/cams.json`` of ``clims-eval``) and whose demo stage's manifest the
false-activation rate. Rows keep the sweep's job order, so a sweep declared in the paper's order (OTM; +BTM; +REG;
+CBS) prints in that order. When the jobs logged to wandb (``pipeline.logger=wandb``), the table is also logged as a
``wandb.Table`` into their wandb group.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_write_text
from clims_pl.pipeline import Stage, finish_wandb_run, read_manifest
from clims_pl.plots import SWEEP_PNG, figures_markdown, sweep_figure
from clims_pl.tables import csv_text, dotted, fmt, markdown_table

TABLE_MD = "ablation.md"
TABLE_CSV = "ablation.csv"
METRICS = ("miou_best", "best_threshold", "miou", "threshold", "cobg_fa")
SEEDS_MD = "seeds.md"
SEEDS_CSV = "seeds.csv"
#: The demo's numbers (``demo_results.json`` keys, %) in the seed table, with their column titles.
SEED_COLUMNS = {
    "baseline_miou": "baseline CAM",
    "clims_miou": "CLIMS CAM",
    "pseudo_miou": "pseudo labels",
    "seg_val_miou": "DeepLab val",
    "seg_val_crf_miou": "DeepLab val + CRF",
    "all_background_miou": "all background",
    "baseline_cobg_fa": "baseline co-bg FA",
    "clims_cobg_fa": "CLIMS co-bg FA",
    "seg_context.with_cobg": "DeepLab obj. acc., co-bg shown",
    "seg_context.without_cobg": "DeepLab obj. acc., co-bg not shown",
}
#: Differences the demo's targets are stated in: (title, minuend key, subtrahend key).
SEED_GAPS = (("pseudo − CLIMS", "pseudo_miou", "clims_miou"), ("DeepLab − pseudo", "seg_val_miou", "pseudo_miou"))


@dataclass(frozen=True)
class Job:
    """One finished (or failed) job of a sweep."""

    num: int
    dir: Path
    overrides: dict[str, str]  # task overrides of this job, key → value as typed
    config: DictConfig | None  # the resolved pipeline config it wrote; None if it died before writing it


def find_jobs(sweep_dir: str | Path) -> list[Job]:
    """Jobs of ``sweep_dir`` (every sub-folder with ``.hydra/``), in the sweep's job order."""
    jobs = []
    for hydra_dir in Path(sweep_dir).glob("*/.hydra"):
        job_dir = hydra_dir.parent
        num = int(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.num)
        overrides = dict(_split_override(str(o)) for o in OmegaConf.load(hydra_dir / "overrides.yaml"))
        config = OmegaConf.load(job_dir / "config.yaml") if (job_dir / "config.yaml").is_file() else None
        jobs.append(Job(num, job_dir, overrides, config))
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (*/.hydra/): pass the folder of a clims-reproduce -m run")
    return sorted(jobs, key=lambda j: j.num)


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose value differs between jobs (all but ``experiment`` for a single job), in first-seen order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    if len(jobs) == 1:
        return [k for k in keys if k != "experiment"]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def setting_value(job: Job, key: str) -> Any:
    """What a swept key set in this job, read from its resolved config: a group's ``label`` (``ablation`` → "OTM+BTM"),
    a scalar as resolved (``pipeline.set.clims.loss.alpha`` → 10.0), else the override as typed."""
    node = OmegaConf.select(job.config, key, default=None) if job.config is not None else None
    if isinstance(node, DictConfig) and "label" in node:
        return node.label
    if node is not None and not OmegaConf.is_config(node):
        return node
    return job.overrides.get(key, "")


def _stage_dir(config: DictConfig, name: str) -> Path:
    node = config.pipeline.stages.get(name)
    if node is None:
        raise ValueError(f"stage {name!r} is not in this job's pipeline ({', '.join(config.pipeline.stages)})")
    return Stage.from_config(name, node).folder(Path(config.run_dir))


def eval_metrics(job: Job, eval_stage: str | None) -> dict[str, Any] | None:
    """The CAM evaluation of a job (its eval stage's manifest metrics: ``clims-eval``'s result, sweep included);
    None until that stage finished. ``eval_stage`` None: the job's ``ablation_sweep.eval_stage``."""
    if job.config is None:
        return None
    eval_stage = eval_stage or (job.config.get("ablation_sweep") or {}).get("eval_stage")
    if not eval_stage:
        raise ValueError(f"{job.dir}: no ablation_sweep.eval_stage in its config.yaml; pass --eval-stage")
    return (read_manifest(_stage_dir(job.config, eval_stage)) or {}).get("metrics")


def job_row(job: Job, keys: Sequence[str], eval_stage: str | None, demo_stage: str | None) -> dict[str, Any]:
    """Settings + metrics of one job (mIoU in %, NaN where a stage has not finished; ``status`` says which)."""
    row: dict[str, Any] = {"job": job.num, **{_column(k): setting_value(job, k) for k in keys}}
    row.update(dict.fromkeys(METRICS, math.nan))
    if job.config is None:
        return {**row, "status": "not started", "run_dir": str(job.dir)}
    sweep = job.config.get("ablation_sweep") or {}
    eval_stage = eval_stage or sweep.get("eval_stage")
    demo_stage = demo_stage or sweep.get("demo_stage")
    status = []
    metrics = eval_metrics(job, eval_stage)
    if metrics:
        row.update(
            miou_best=_pct(metrics.get("best_miou")),
            best_threshold=metrics.get("best_threshold", math.nan),
            miou=_pct(metrics.get("miou")),
            threshold=metrics.get("threshold", math.nan),
        )
    else:
        status.append(f"{eval_stage} not finished")
    if demo_stage:
        demo = (read_manifest(_stage_dir(job.config, demo_stage)) or {}).get("metrics")
        if demo and demo.get("clims_cobg_fa") is not None:
            row["cobg_fa"] = float(demo["clims_cobg_fa"])
        else:
            status.append(f"{demo_stage} not finished")
    return {**row, "status": "; ".join(status) or "ok", "run_dir": str(job.config.run_dir)}


def _column(key: str) -> str:
    return key.removeprefix("pipeline.set.")


def _pct(value: Any) -> float:
    return 100.0 * float(value) if isinstance(value, int | float) else math.nan


def render_markdown(title: str, rows: list[dict[str, Any]], settings: list[str], sweep_dir: Path) -> str:
    """The table as in the paper's ablation: one row per setting, CAM mIoU at the best and the reference threshold."""
    thresholds = {r["threshold"] for r in rows if not math.isnan(r["threshold"])}
    ref = f"@ {thresholds.pop():.2f}" if len(thresholds) == 1 else "@ ref thr"
    with_cobg = any(not math.isnan(r["cobg_fa"]) for r in rows)
    header = ["job", *settings, "CAM mIoU best (thr)", f"CAM mIoU {ref}"]
    header += ["co-occurring-bg false activation (%)"] if with_cobg else []
    lines = [f"# {title}", "", f"sweep `{sweep_dir}`, {len(rows)} jobs", ""]
    table = []
    for r in rows:
        cells = [str(r["job"]), *(fmt(r[s], 4) for s in settings)]
        cells += [f"{fmt(r['miou_best'])} ({fmt(r['best_threshold'], 2)})", fmt(r["miou"])]
        cells += [fmt(r["cobg_fa"])] if with_cobg else []
        if r["status"] != "ok":
            cells[0] += f" ({r['status']})"
        table.append(cells)
    return "\n".join(lines + markdown_table(header, table)) + "\n"


def wandb_target(jobs: Sequence[Job]) -> dict[str, Any] | None:
    """The wandb logger (project, group, offline) of the jobs' stages, from the ``config.yaml`` a training stage
    writes; a job's own stages first (a shared stage skipped by this sweep still shows the sweep that ran it)."""
    for job in jobs:
        if job.config is None:
            continue
        stages = sorted(job.config.pipeline.stages.items(), key=lambda item: bool(item[1] and item[1].get("dir")))
        for name, node in stages:
            path = _stage_dir(job.config, name) / "config.yaml" if node is not None else None
            logger = OmegaConf.load(path).get("logger") if path is not None and path.is_file() else None
            if logger and logger.get("wandb"):
                w = logger.wandb
                return {"project": w.get("project"), "group": w.get("group"), "offline": bool(w.get("offline"))}
    return None


def log_wandb_table(rows: list[dict[str, Any]], target: dict[str, Any], save_dir: Path, title: str) -> Path:
    """Log the table as a ``wandb.Table`` in a run of the jobs' group; returns that run's folder."""
    import wandb

    finish_wandb_run()
    run = wandb.init(
        project=target["project"],
        group=target["group"],
        job_type="ablation_table",
        name=f"{target['group']}_table",
        dir=str(save_dir),
        mode="offline" if target["offline"] else None,
        config={"title": title, "sweep_dir": str(save_dir)},
    )
    columns = list(rows[0])
    data = [[None if isinstance(v, float) and math.isnan(v) else v for v in r.values()] for r in rows]
    run.log({"ablation": wandb.Table(columns=columns, data=data)})
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir


def aggregate(
    sweep_dir: str | Path,
    eval_stage: str | None = None,
    demo_stage: str | None = None,
    use_wandb: bool = True,
) -> dict[str, Any]:
    """Write ``ablation.md`` / ``ablation.csv`` into ``sweep_dir`` (and the wandb table when the jobs used wandb).

    With the finished jobs' threshold sweeps as a figure beside the table (``cam_sweep.png``, linked from it).
    Returns ``rows`` (one dict per job), the written paths and ``wandb_run`` (its folder or None).
    """
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    keys = swept_keys(jobs)
    rows = [job_row(job, keys, eval_stage, demo_stage) for job in jobs]
    first = next((j.config for j in jobs if j.config is not None), None)
    title = ((first.get("ablation_sweep") or {}).get("title") if first is not None else None) or sweep_dir.name
    settings = [_column(k) for k in keys]
    md = render_markdown(title, rows, settings, sweep_dir)
    # One threshold-sweep curve per finished job, labelled with its settings, beside the table.
    curves = {
        f"job {row['job']}: " + ", ".join(f"{k}={row[k]}" for k in settings): metrics
        for job, row in zip(jobs, rows, strict=True)
        if (metrics := eval_metrics(job, eval_stage)) and metrics.get("sweep")
    }
    if curves:
        md += figures_markdown(
            {"CAM threshold sweep per job": sweep_figure(curves, sweep_dir / SWEEP_PNG, title)}, sweep_dir / TABLE_MD
        )
    atomic_write_text(sweep_dir / TABLE_MD, md)
    atomic_write_text(sweep_dir / TABLE_CSV, csv_text(rows))
    print(md)
    target = wandb_target(jobs) if use_wandb else None
    wandb_run = log_wandb_table(rows, target, sweep_dir, title) if target else None
    return {"rows": rows, "markdown": sweep_dir / TABLE_MD, "csv": sweep_dir / TABLE_CSV, "wandb_run": wandb_run}


def seed_row(job: Job, demo_stage: str) -> dict[str, Any]:
    """One job's demo numbers (NaN where its demo stage has not finished) and the target gaps."""
    path = _stage_dir(job.config, demo_stage) / "demo_results.json" if job.config is not None else None
    results = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    row: dict[str, Any] = {"seed": job.overrides.get("seed", "—")}
    row.update({key: float(v) if (v := dotted(results, key)) is not None else math.nan for key in SEED_COLUMNS})
    row.update({title: row[a] - row[b] for title, a, b in SEED_GAPS})
    return {**row, "status": "ok" if results else f"{demo_stage} not finished"}


def seed_table(sweep_dir: str | Path, demo_stage: str = "demo") -> dict[str, Any]:
    """``seeds.md`` / ``seeds.csv`` in ``sweep_dir``: every demo number per seed, then its mean and sample standard
    deviation over the finished seeds (``clims-reproduce -m experiment=toy_demo_seeds``)."""
    sweep_dir = Path(sweep_dir)
    rows = [seed_row(job, demo_stage) for job in find_jobs(sweep_dir)]
    columns = [*SEED_COLUMNS, *(title for title, _, _ in SEED_GAPS)]
    done = [r for r in rows if r["status"] == "ok"]
    values = {c: [r[c] for r in done if not math.isnan(r[c])] for c in columns}
    spread = {
        "mean": {c: statistics.fmean(v) if v else math.nan for c, v in values.items()},
        "sd": {c: statistics.stdev(v) if len(v) > 1 else math.nan for c, v in values.items()},
    }
    header = ["seed", *(SEED_COLUMNS.get(c, c) for c in columns)]
    table = [
        [r["seed"] + ("" if r["status"] == "ok" else f" ({r['status']})"), *(fmt(r[c]) for c in columns)] for r in rows
    ]
    table += [[f"**{name}**", *(fmt(values[c]) for c in columns)] for name, values in spread.items()]
    title = f"# Toy demo over {len(done)} seeds (mIoU and false activation in %)"
    md = "\n".join([title, "", f"sweep `{sweep_dir}`", "", *markdown_table(header, table)]) + "\n"
    atomic_write_text(sweep_dir / SEEDS_MD, md)
    atomic_write_text(sweep_dir / SEEDS_CSV, csv_text([*rows, *({"seed": k, **v} for k, v in spread.items())]))
    print(md)
    return {"rows": rows, **spread, "markdown": sweep_dir / SEEDS_MD}


class SeedTable(Callback):
    """Hydra callback: when a multirun over seeds ends, the table of its demo numbers (:func:`seed_table`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        seed_table(Path(config.hydra.sweep.dir))


class AblationTable(Callback):
    """Hydra callback: when a multirun ends, the table of all its jobs (``hydra.callbacks.ablation_table``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        aggregate(Path(config.hydra.sweep.dir))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clims_pl.ablation",
        description="Collect every job of a clims-reproduce -m sweep into <sweep_dir>/ablation.md and ablation.csv "
        "(swept settings, CAM mIoU at the best and the reference threshold, co-occurring-background false activation "
        "when the jobs ran the demo stage); also a wandb.Table when the jobs logged to wandb.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. multirun/ablation_losses/<time>")
    parser.add_argument("--eval-stage", help="evaluation stage to read (default: ablation_sweep.eval_stage)")
    parser.add_argument("--demo-stage", help="demo stage to read (default: ablation_sweep.demo_stage)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to wandb")
    parser.add_argument(
        "--seeds", action="store_true", help="a sweep over seeds (experiment=toy_demo_seeds): seeds.md with mean and sd"
    )
    args = parser.parse_args(argv)
    try:
        if args.seeds:
            seed_table(args.sweep_dir, args.demo_stage or "demo")
        else:
            aggregate(args.sweep_dir, args.eval_stage, args.demo_stage, use_wandb=not args.no_wandb)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
