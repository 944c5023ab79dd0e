"""The paper table: our measured numbers beside the paper's and the reference repo's (`report.md`, `report.csv`).

Everything printed is read from the stage manifests the pipeline wrote; reference numbers come from
``resources/paper_results.yaml`` (one file, sources named). Nothing here is a constant result.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_write_text
from clims_pl.pipeline import MANIFEST, read_manifest
from clims_pl.plots import figures_markdown, run_figures
from clims_pl.runtime import prepare_run
from clims_pl.tables import csv_text, fmt, markdown_table

REFERENCE_FILE = Path(__file__).parents[1] / "resources" / "paper_results.yaml"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lookup(metrics: dict[str, Any], key: str) -> Any:
    """``a.b.c`` path into nested metrics; None if absent."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def collect_rows(run_dir: Path, rows: list[dict[str, Any]], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per configured metric: ours (from the stage manifest) vs paper and repo."""
    table = []
    for row in rows:
        manifest = read_manifest(run_dir / row["stage"]) or {}
        ours = lookup(manifest.get("metrics", {}), row["key"])
        ref = reference["metrics"].get(row.get("ref", ""), {})
        threshold = lookup(manifest.get("metrics", {}), row["threshold_key"]) if row.get("threshold_key") else None
        # Stage metrics are fractions (0-1); the paper's table is in percent.
        ours_f = float(ours) * row.get("scale", 100.0) if isinstance(ours, int | float) else math.nan
        table.append(
            {
                "metric": row.get("label") or ref.get("label") or row["key"],
                "ours": ours_f,
                "paper": ref.get("paper", math.nan),
                "repo": ref.get("repo", math.nan),
                "delta_vs_repo": ours_f - ref["repo"] if "repo" in ref else math.nan,
                "threshold": threshold if threshold is not None else "",
                "stage": row["stage"],
            }
        )
    return table


def stage_times(run_dir: Path) -> list[tuple[str, float, str]]:
    out = []
    for manifest_path in sorted(run_dir.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime):
        m = read_manifest(manifest_path.parent) or {}
        out.append(
            (m.get("stage", manifest_path.parent.name), float(m.get("wall_s", math.nan)), m.get("config_hash", ""))
        )
    return out


def render_markdown(title: str, table: list[dict[str, Any]], times: list[tuple[str, float, str]], commit: str) -> str:
    lines = [f"# {title}", "", f"git commit `{commit}`", ""]
    header = ["metric", "ours", "paper", "repo", "ours − repo", "threshold", "stage"]
    numbers = ("ours", "paper", "repo", "delta_vs_repo")
    lines += markdown_table(
        header, [[r["metric"], *(fmt(r[c]) for c in numbers), r["threshold"], r["stage"]] for r in table]
    )
    times_rows = [[name, f"{wall:.1f}", f"`{h}`"] for name, wall, h in times]
    lines += ["", *markdown_table(["stage", "wall time (s)", "config hash"], times_rows)]
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write ``report.md`` and ``report.csv`` into the stage dir, with the run's figures (clims_pl.plots) beside
    them and linked from ``report.md``; return ``{metric key: ours}``."""
    out = prepare_run(cfg)
    run_dir = Path(cfg.report.run_dir)
    reference = yaml.safe_load(Path(cfg.report.get("reference") or REFERENCE_FILE).read_text())
    rows = OmegaConf.to_container(cfg.report.rows, resolve=True)
    table = collect_rows(run_dir, rows, reference)
    times = stage_times(run_dir)
    md = render_markdown(cfg.report.title, table, times, git_commit())
    figures = run_figures(run_dir, out, [(name, wall) for name, wall, _ in times])
    md += figures_markdown(figures, out / "report.md")
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", csv_text(table, ["metric"]))
    print(md)
    return {r["key"]: t["ours"] for r, t in zip(rows, table, strict=True)}
