"""`clims-reproduce`: the paper's pipeline as a chain of resumable stages that exchange artifacts on disk.

A stage is an ordinary entry point (``clims-train``, ``clims-infer``, ``clims-eval`` ...), named by its registry
name (``run: cams``, :data:`clims_pl.stages.REGISTRY`), run on a config composed from its root config plus overrides, with its outputs under ``<run_dir>/<stage>/``. After it finishes, the stage writes
``manifest.json``: the hash of its resolved config, the fingerprints of the artifacts it consumed (its dependencies'
outputs) and of those it produced, wall time and metrics. On the next run a stage is skipped when all of those still
match, so

* rerunning a finished pipeline costs seconds;
* deleting an artifact reruns that stage and, since its outputs' fingerprint changes, every stage after it;
* a stage that runs starts by claiming its folder (``provenance.json`` = its config hash and inputs, see
  clims_pl/provenance.py): a killed stage of the same config and inputs resumes, training stages from their
  ``last.ckpt`` (their overrides say ``ckpt_path=last``) and per-image stages skipping the files already written;
* any other rerun (changed config, changed inputs, a deleted or touched output, ``--from``/``--only``) empties the
  stage's folder first, so no artifact of other inputs survives.

Sweeps reach inside stages with ``pipeline.set.<stage>`` (a nested or dotted mapping appended to that stage's
overrides: ``clims-reproduce -m experiment=toy_ablation pipeline.set.clims.loss.alpha=1,10``), and a stage with a
``dir`` (an absolute folder instead of ``<run_dir>/<stage>``) is shared by every run that names it: the first sweep
job trains the baseline there, the others find its manifest current and skip it. ``pipeline.logger`` picks the
logger option of every stage that has a ``logger`` group, and ``pipeline.wandb_group`` the wandb group they join
(default: the task name, or ``<task name>_<sweep folder>`` for every job of a multirun).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from clims_pl.config import CONF_DIR
from clims_pl.dashboard import publish
from clims_pl.io import atomic_write_json
from clims_pl.provenance import claim, config_hash, fingerprint
from clims_pl.runtime import prepare_run
from clims_pl.stages import REGISTRY, stage_spec

MANIFEST = "manifest.json"
console = Console()
#: Wraps each stage that runs (not a skipped one), e.g. to measure it (clims_pl.preflight).
StageProbe = Callable[["Stage", DictConfig], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: which entry point, with which overrides, after which stages."""

    name: str
    config: str  # root config name in conf/ (train, infer, eval, ...), from the stage's registry entry
    target: str  # "module:function" taking the composed config, from the stage's registry entry
    after: tuple[str, ...]
    overrides: tuple[str, ...]
    outputs: tuple[str, ...]  # paths (relative to the stage dir) whose fingerprints define the stage's result
    dir: str | None = None  # absolute stage folder shared by several runs; None = <run_dir>/<name>

    @classmethod
    def from_config(cls, name: str, node: DictConfig, extra: Iterable[str] = ()) -> Stage:
        """``pipeline.stages.<name>``; ``extra`` overrides (pipeline.set, logger) come after the stage's own.

        ``run`` names the registry entry (:data:`clims_pl.stages.REGISTRY`) that gives the root config and entry
        point; without it the stage's own name is looked up (``pseudo``, ``report`` ...)."""
        unknown = set(node) - {"run", "after", "overrides", "outputs", "dir"}
        if unknown:
            raise ValueError(
                f"pipeline.stages.{name}: unknown keys {sorted(unknown)}; a stage names what it runs with "
                f"`run: <stage>` (one of {', '.join(REGISTRY)}) plus after/overrides/outputs/dir"
            )
        spec = stage_spec(str(node.get("run") or name), f"pipeline.stages.{name}.run")
        folder = node.get("dir")
        if folder is not None and not Path(folder).is_absolute():
            raise ValueError(
                f"pipeline.stages.{name}.dir={folder}: must be an absolute folder, e.g. ${{paths.root_dir}}/runs/shared/{name}"
            )
        return cls(
            name=name,
            config=spec.config,
            target=spec.target,
            after=tuple(node.get("after") or ()),
            overrides=(*(str(o) for o in node.get("overrides") or ()), *extra),
            outputs=tuple(node.get("outputs") or ()),
            dir=None if folder is None else str(folder),
        )

    def folder(self, run_dir: Path) -> Path:
        return Path(self.dir) if self.dir else run_dir / self.name


_PLAIN = re.compile(r"[A-Za-z_/][\w./@:+-]*")
_KEYWORDS = {"true", "false", "null", "nan", "inf"}
_PARSER = OverridesParser.create()


def hydra_value(value: Any) -> str:
    """A Python value (from ``OmegaConf.to_container``) in Hydra's override grammar: the same value once parsed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    # Inside quotes Hydra unescapes only backslashes that precede a quote (or the closing quote).
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body) + "'"


def set_overrides(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{loss: {alpha: 1}, "data.batch_size": 8}`` → ``["loss.alpha=1", "data.batch_size=8"]``.

    Nested and dotted keys both reach a stage key; a key may carry Hydra's ``+``/``++`` prefix to add a key the
    stage config lacks. A string value that names a group option (``clip: tiny``) selects it.
    """
    out: list[str] = []
    for key, value in settings.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out += set_overrides(value, path)
        else:
            out.append(f"{path}={hydra_value(value)}")
    return out


def root_chain(config: str) -> list[DictConfig]:
    """Root config ``conf/<config>.yaml`` and every root config it extends through its defaults
    (``conf/toyclip.yaml`` lists ``train``), as loaded YAML, the config itself first."""
    node = OmegaConf.load(CONF_DIR / f"{config}.yaml")
    bases = [d for d in node.get("defaults") or [] if isinstance(d, str) and d not in ("_self_", config)]
    return [node, *(n for d in bases if (CONF_DIR / f"{d}.yaml").is_file() for n in root_chain(d))]


def default_groups(config: str) -> set[str]:
    """Config groups listed in the defaults of root config ``conf/<config>.yaml`` (e.g. {data, logger, ...}), and in
    those of another root config it extends."""
    return {
        str(k).removeprefix("override ")
        for node in root_chain(config)
        for d in node.get("defaults") or []
        if isinstance(d, Mapping)
        for k in d
    }


def has_seed(config: str) -> bool:
    """Whether root config ``conf/<config>.yaml`` (or a root config it extends) has a top-level ``seed`` key."""
    return any("seed" in node for node in root_chain(config))


def seed_overrides(config: str, node: DictConfig, seed: int | None) -> list[str]:
    """``seed=<seed>`` for a stage whose root config has a seed, unless the stage is shared (``dir:``): a shared
    stage such as the toy CLIP teacher is one for every seed, as a downloaded CLIP is."""
    if seed is None or node.get("dir") is not None or not has_seed(config):
        return []
    return [f"seed={int(seed)}"]


def logger_overrides(config: str, logger: str | None, wandb_group: str | None, stage: str | None = None) -> list[str]:
    """``logger=<option>`` for a stage whose root config has a logger group (every stage's); if that option logs to
    wandb, its runs join ``wandb_group`` so that every stage of a run (every job of a sweep) is shown together, one
    run per stage named after it (``job_type`` = ``stage``)."""
    if not logger or "logger" not in default_groups(config):
        return []
    path = CONF_DIR / "logger" / f"{logger}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"pipeline.logger={logger}: no {path}; pick one of {options}")
    out = [f"logger={logger}"]
    option = OmegaConf.load(path)
    if wandb_group and ("wandb" in option or "wandb" in (option.get("defaults") or [])):
        out.append(f"logger.wandb.group={hydra_value(str(wandb_group))}")
        if stage:
            out += [f"logger.wandb.name={hydra_value(stage)}", f"logger.wandb.job_type={hydra_value(stage)}"]
    return out


def check_plain_folder(key: str, folder: str | Path) -> None:
    """Stage overrides embed run_dir and stage dirs as typed (``ckpt=${run_dir}/...``), so Hydra must read them back
    unquoted; a sweep subdir named ``0_a=1,b=2`` (Hydra's override_dirname) would not be."""
    try:
        same = _PARSER.parse_override(f"k={folder}").value() == str(folder)
    except HydraException:
        same = False
    if not same:
        raise ValueError(
            f"{key}={folder}: stage overrides embed this folder and Hydra cannot read it back ('=', ',', quotes or "
            "brackets in it); use a plainer name, e.g. hydra.sweep.subdir=${hydra.job.num}"
        )


def default_wandb_group(cfg: DictConfig) -> str:
    """The task name; in a multirun ``<task name>_<sweep folder>``, the same for every job of the sweep (a
    ``${now:}`` in the config would not be: each job resolves it at its own start)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{cfg.task_name}_{Path(HydraConfig.get().sweep.dir).name}"
    return str(cfg.task_name)


def stages_from_config(pipeline: DictConfig, default_group: str | None = None, seed: int | None = None) -> list[Stage]:
    """The stages of ``cfg.pipeline``, each with its ``pipeline.set.<stage>``, seed (:func:`seed_overrides`) and
    logger overrides appended (wandb runs join ``pipeline.wandb_group``, else ``default_group``)."""
    nodes = {name: node for name, node in pipeline.stages.items() if node is not None}
    settings = OmegaConf.to_container(pipeline.get("set") or OmegaConf.create(), resolve=True)
    # A stage switched off (null) keeps its settings unused; a name that is no stage at all is a typo.
    unknown = sorted(set(settings) - set(pipeline.stages))
    if unknown:
        raise ValueError(f"pipeline.set: no stage named {unknown}; stages of this pipeline: {', '.join(nodes)}")
    logger, group = pipeline.get("logger"), pipeline.get("wandb_group") or default_group
    return [
        Stage.from_config(
            name,
            node,
            [
                *seed_overrides(stage_config(name, node), node, seed),
                *set_overrides(settings.get(name) or {}),
                *logger_overrides(stage_config(name, node), logger, group, name),
            ],
        )
        for name, node in nodes.items()
    ]


def stage_config(name: str, node: DictConfig) -> str:
    """The root config of ``pipeline.stages.<name>`` (its registry entry's)."""
    return stage_spec(str(node.get("run") or name), f"pipeline.stages.{name}.run").config


def compose_stage(stage: Stage, stage_dir: Path, root_dir: Path, common: Iterable[str]) -> DictConfig:
    """The stage's full config: its root config + the pipeline's common overrides + its own, rooted in stage_dir."""
    paths = [f"paths.root_dir={hydra_value(str(root_dir))}", f"paths.output_dir={hydra_value(str(stage_dir))}"]
    overrides = [*common, *stage.overrides, *paths]
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
    probe: StageProbe | None = None,
) -> dict[str, dict[str, Any]]:
    """Run (or skip) every stage in order; return each stage's manifest. ``probe`` wraps every stage that runs."""
    forced = plan(stages, from_stage, only)
    manifests: dict[str, dict[str, Any]] = {}
    for stage in stages:
        missing = [d for d in stage.after if d not in manifests]
        if missing:
            raise ValueError(f"stage {stage.name!r} runs after {missing}, which must come earlier in the stage list")
        stage_dir = stage.folder(run_dir)
        with shared_stage_lock(stage, stage_dir):
            manifests[stage.name] = _run_or_skip(stage, stage_dir, root_dir, common, manifests, forced, only, probe)
    return manifests


@contextmanager
def shared_stage_lock(stage: Stage, stage_dir: Path) -> Iterator[None]:
    """A stage with its own ``dir`` may be reached by several sweep jobs at once (a parallel launcher): they take
    turns, so the first one runs it and the others then find its manifest current and skip it."""
    if stage.dir is None:
        yield
        return
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(stage_dir.parent / f".{stage_dir.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_or_skip(
    stage: Stage,
    stage_dir: Path,
    root_dir: Path,
    common: Iterable[str],
    manifests: dict[str, dict[str, Any]],
    forced: set[str],
    only: list[str] | None,
    probe: StageProbe | None = None,
) -> dict[str, Any]:
    cfg = compose_stage(stage, stage_dir, root_dir, common)
    cfg_hash = config_hash(cfg)
    inputs = {d: manifests[d]["outputs_fingerprint"] for d in stage.after}
    outputs = [stage_dir / o for o in stage.outputs]
    old = read_manifest(stage_dir)
    if only and stage.name not in only:
        if old is None or not old.get("finished"):
            raise RuntimeError(f"--only {only}: stage {stage.name!r} has not run yet in {stage_dir}; run it first")
        return old
    if stage.name not in forced and is_current(old, cfg_hash, inputs, fingerprint(outputs)):
        console.print(f"[green]✓ {stage.name}[/green] up to date ({old['wall_s']:.1f} s when it ran) — skipped")
        return old
    finished = bool(old and old.get("finished"))
    if stage.dir is not None and finished and (old.get("config_hash"), old.get("inputs")) != (cfg_hash, inputs):
        raise RuntimeError(
            f"shared stage {stage.name!r} in {stage_dir} was run with another config or inputs "
            f"({old.get('config_hash')}, now {cfg_hash}): runs sharing a stage must not change it; delete that folder "
            "or set another dir"
        )
    # Only an interrupted run of the same config and inputs resumes; a finished result that is no longer current
    # (changed config, inputs or outputs) and a forced stage are recomputed from an empty folder.
    record = {"stage": stage.name, "config_hash": cfg_hash, "inputs": inputs}
    claim(
        stage_dir, record, what=f"outputs of stage {stage.name}", overwrite=True, fresh=finished or stage.name in forced
    )
    console.rule(f"stage {stage.name}")
    start = time.perf_counter()
    module_name, func_name = stage.target.split(":")
    try:
        with probe(stage, cfg) if probe else nullcontext():
            result = getattr(importlib.import_module(module_name), func_name)(cfg)
        publish(stage.name, stage_dir, cfg)  # its numbers, curves and pictures to its loggers (clims_pl.dashboard)
    finally:
        finish_wandb_run()
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
    return manifest


def objective(cfg: DictConfig, manifests: dict[str, dict[str, Any]]) -> float | None:
    """The number a sweeper optimises (Hydra's Optuna sweeper reads the task's return value): ``pipeline.objective``
    = ``"<stage>:<metric key>"`` (dotted, e.g. ``eval_cams:best_miou``) in that stage's manifest; None when unset."""
    spec = cfg.pipeline.get("objective")
    if not spec:
        return None
    stage, _, key = str(spec).partition(":")
    if stage not in manifests:
        raise ValueError(f"pipeline.objective={spec}: no stage {stage!r}; stages: {', '.join(manifests)}")
    metrics = manifests[stage].get("metrics") or {}
    value = OmegaConf.select(OmegaConf.create(metrics), key, default=None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"pipeline.objective={spec}: no number at {key!r} in {stage}'s metrics ({', '.join(metrics)})")
    return float(value)


def finish_wandb_run() -> None:
    """Close the wandb run a stage left open (Lightning's WandbLogger never finishes it): the next stage's logger
    would otherwise adopt it and log into the previous stage's run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _jsonable(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        return {}
    return json.loads(json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run(cfg: DictConfig, probe: StageProbe | None = None) -> dict[str, dict[str, Any]]:
    """The stages of ``cfg.pipeline`` in ``cfg.run_dir`` (``clims-reproduce``, through :mod:`clims_pl.stages.reproduce`,
    which also runs them in miniature first when ``preflight=true``)."""
    prepare_run(cfg)
    p = cfg.pipeline
    stages = stages_from_config(p, default_wandb_group(cfg), cfg.get("seed"))
    if not stages:
        raise ValueError("pipeline.stages is empty: pick an experiment, e.g. experiment=paper_voc or toy_demo")
    check_plain_folder("run_dir", cfg.run_dir)
    for stage in stages:
        if stage.dir:
            check_plain_folder(f"pipeline.stages.{stage.name}.dir", stage.dir)
    only = list(p.only) if p.get("only") else None
    return run_pipeline(
        stages,
        run_dir=Path(cfg.run_dir),
        root_dir=Path(cfg.paths.root_dir),
        common=[str(o) for o in p.get("common") or ()],
        from_stage=p.get("from_stage"),
        only=only,
        probe=probe,
    )
