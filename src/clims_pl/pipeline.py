"""`clims-reproduce`: the paper's pipeline as a chain of resumable stages that exchange artifacts on disk.

A stage is an ordinary entry point (``clims-train``, ``clims-infer``, ``clims-eval`` ...) run on a config composed from
its own root config plus overrides, with its outputs under ``<run_dir>/<stage>/``. After it finishes, the stage writes
``manifest.json``: the hash of its resolved config, the fingerprints of the artifacts it consumed (its dependencies'
outputs) and of those it produced, wall time and metrics. On the next run a stage is skipped when all of those still
match, so

* rerunning a finished pipeline costs seconds;
* deleting an artifact reruns that stage and, since its outputs' fingerprint changes, every stage after it;
* a killed stage has no finished manifest and runs again, training stages resuming from their ``last.ckpt``
  (their overrides say ``ckpt_path=last``) and per-image stages skipping the files already written;
* a changed config of a stage wipes that stage's folder first, so no artifact of another config survives.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from clims_pl.config import CONF_DIR
from clims_pl.io import atomic_write_json
from clims_pl.runtime import prepare_run

MANIFEST = "manifest.json"
console = Console()


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: which entry point, with which overrides, after which stages."""

    name: str
    config: str  # root config name in conf/ (train, infer, eval, ...)
    target: str  # "module:function" taking the composed config
    after: tuple[str, ...]
    overrides: tuple[str, ...]
    outputs: tuple[str, ...]  # paths (relative to the stage dir) whose fingerprints define the stage's result

    @classmethod
    def from_config(cls, name: str, node: DictConfig) -> Stage:
        unknown = set(node) - {"config", "target", "after", "overrides", "outputs"}
        if unknown:
            raise ValueError(f"pipeline.stages.{name}: unknown keys {sorted(unknown)}")
        return cls(
            name=name,
            config=node.config,
            target=node.target,
            after=tuple(node.get("after") or ()),
            overrides=tuple(str(o) for o in node.get("overrides") or ()),
            outputs=tuple(node.get("outputs") or ()),
        )


def fingerprint(paths: Iterable[Path]) -> str:
    """Cheap identity of files/folders: names, sizes and mtimes (a rewritten file gets a new mtime)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            else:
                h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:16]


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:16]


def compose_stage(stage: Stage, stage_dir: Path, root_dir: Path, common: Iterable[str]) -> DictConfig:
    """The stage's full config: its root config + the pipeline's common overrides + its own, rooted in stage_dir."""
    overrides = [*common, *stage.overrides, f"paths.root_dir={root_dir}", f"paths.output_dir={stage_dir}"]
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name=stage.config, overrides=overrides)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name=stage.config, overrides=overrides)
    with open_dict(cfg):
        cfg.print_config = False
    return cfg


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current(manifest: dict[str, Any] | None, cfg_hash: str, inputs: dict[str, str], outputs_fp: str) -> bool:
    return bool(
        manifest
        and manifest.get("finished")
        and manifest.get("config_hash") == cfg_hash
        and manifest.get("inputs") == inputs
        and manifest.get("outputs_fingerprint") == outputs_fp
    )


def plan(stages: list[Stage], from_stage: str | None, only: list[str] | None) -> set[str]:
    """Stages forced to run regardless of their manifest (``--from`` and ``--only``)."""
    names = [s.name for s in stages]
    for name in [from_stage, *(only or [])]:
        if name is not None and name not in names:
            raise ValueError(f"unknown stage {name!r}; stages of this pipeline: {', '.join(names)}")
    if only:
        return set(only)
    if from_stage:
        return set(names[names.index(from_stage) :])
    return set()


def run_pipeline(
    stages: list[Stage],
    run_dir: Path,
    root_dir: Path,
    common: Iterable[str] = (),
    from_stage: str | None = None,
    only: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or skip) every stage in order; return each stage's manifest."""
    forced = plan(stages, from_stage, only)
    manifests: dict[str, dict[str, Any]] = {}
    for stage in stages:
        stage_dir = run_dir / stage.name
        missing = [d for d in stage.after if d not in manifests]
        if missing:
            raise ValueError(f"stage {stage.name!r} runs after {missing}, which must come earlier in the stage list")
        cfg = compose_stage(stage, stage_dir, root_dir, common)
        cfg_hash = config_hash(cfg)
        inputs = {d: manifests[d]["outputs_fingerprint"] for d in stage.after}
        outputs = [stage_dir / o for o in stage.outputs]
        old = read_manifest(stage_dir)
        if only and stage.name not in only:
            if old is None:
                raise RuntimeError(f"--only {only}: stage {stage.name!r} has not run yet in {run_dir}; run it first")
            manifests[stage.name] = old
            continue
        if stage.name not in forced and is_current(old, cfg_hash, inputs, fingerprint(outputs)):
            console.print(f"[green]✓ {stage.name}[/green] up to date ({old['wall_s']:.1f} s when it ran) — skipped")
            manifests[stage.name] = old
            continue
        if old is not None and old.get("config_hash") != cfg_hash and stage_dir.exists():
            console.print(f"[yellow]{stage.name}: config changed, clearing {stage_dir}[/yellow]")
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        console.rule(f"stage {stage.name}")
        start = time.perf_counter()
        module_name, func_name = stage.target.split(":")
        result = getattr(importlib.import_module(module_name), func_name)(cfg)
        manifest = {
            "stage": stage.name,
            "config_hash": cfg_hash,
            "inputs": inputs,
            "outputs": list(stage.outputs),
            "outputs_fingerprint": fingerprint(outputs),
            "finished": True,
            "wall_s": round(time.perf_counter() - start, 2),
            "metrics": _jsonable(result),
        }
        atomic_write_json(stage_dir / MANIFEST, manifest)
        console.print(f"[green]✓ {stage.name}[/green] done in {manifest['wall_s']:.1f} s")
        manifests[stage.name] = manifest
    return manifests


def _jsonable(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        return {}
    return json.loads(json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Entry of ``clims-reproduce`` / ``clims-demo``: the stages of ``cfg.pipeline`` in ``cfg.run_dir``."""
    prepare_run(cfg)
    p = cfg.pipeline
    stages = [Stage.from_config(name, node) for name, node in p.stages.items() if node is not None]
    if not stages:
        raise ValueError("pipeline.stages is empty: pick an experiment, e.g. experiment=paper_voc or toy_demo")
    only = list(p.only) if p.get("only") else None
    return run_pipeline(
        stages,
        run_dir=Path(cfg.run_dir),
        root_dir=Path(cfg.paths.root_dir),
        common=[str(o) for o in p.get("common") or ()],
        from_stage=p.get("from_stage"),
        only=only,
    )
