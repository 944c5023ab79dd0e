"""``clims-reproduce experiment=paper_voc preflight=true data.root=...``: the real pipeline in miniature.

Every stage of the experiment runs with its real config (architectures, precisions, hand-offs) on the first
``preflight_images`` ids of train (which is also the train_aug subset) and of val, each training stage for
``preflight_steps`` optimiser steps, so a config or hand-off error in stage 7 shows up in minutes instead of
after hours of stages 1-6. What changes is an overlay of ``pipeline.set`` overrides (step count, batch size capped
at the images there are, validation once at the end, a step timer, weights) plus two paths:

* the data: a VOC-layout folder of symlinks to those ids (``<preflight dir>/data/...``), given as ``data.root``;
* the run: ``<run_dir>_preflight``, wiped and rerun in full each time. Its stage configs name that data root and
  run folder, so their config hashes differ from the real run's and no real stage can ever be skipped because a
  preflight finished it.

``preflight_weights``: ``auto`` uses the pretrained weights (ImageNet trunks, CLIP) found on disk and random init
for the others, ``pretrained`` the real run's (downloading if needed), ``random`` none (fully offline). The table
(``preflight.md`` + ``preflight.json`` in the preflight folder, also printed) gives per stage the wall time, peak
memory, the effective precision, the weights used, and the full run's time estimated from the measured step
(or per-image) time × the real run's number of steps (images).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from clims_pl.data.toy import BACKGROUND_DIR, TOY_META, generate_toy
from clims_pl.data.voc import VOC_CLASSES, read_split, validate_voc_root
from clims_pl.io import atomic_write_json, atomic_write_text
from clims_pl.pipeline import Stage, compose_stage, console, default_wandb_group, run, stages_from_config
from clims_pl.stages import REGISTRY, stage_spec

#: Real VOC2012 + SBD split sizes (docs/reference.md#image-lists): what the estimates use when ``data.root`` holds fewer images.
VOC_SPLIT_SIZES = {"train_aug": 10_582, "train": 1_464, "val": 1_449}
#: Per-batch times a training stage's StepTimer writes into its stage folder.
STEPS_FILE = "preflight_steps.json"
#: Per-image stages: entry point → config key of the split they go through.
PER_IMAGE_SPLIT = {
    REGISTRY["cams"].target: "infer.split",
    REGISTRY["evaluate"].target: "eval.split",
    REGISTRY["ir_labels"].target: "ir_labels.split",
    REGISTRY["pseudo"].target: "pseudo.split",
    REGISTRY["seg_eval"].target: "seg_eval.val_split",
}
WEIGHTS = ("auto", "pretrained", "random")


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimiser step; data loading excluded) and the
    precision the stage really ran in, written to ``<trainer.default_root_dir>/preflight_steps.json``: the
    trainer's setting, the weights' dtype, the dtype the network's first convolution computed in during the first
    training batch (bf16/fp16 under autocast) and the CLIP teacher's dtype."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.info: dict[str, Any] = {}
        self._start = 0.0
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from clims_pl.models.clip_evaluator import ClipEvaluator

        clip = [_dtype_name(m.dtype) for m in pl_module.modules() if isinstance(m, ClipEvaluator)]
        self.info = {
            "device": str(pl_module.device),
            "trainer_precision": str(trainer.precision),
            "param_dtype": _dtype_name(next(pl_module.parameters()).dtype),
            "clip_dtype": clip[0] if clip else None,
        }
        conv = next((m for m in pl_module.modules() if isinstance(m, torch.nn.Conv2d)), None)
        if conv is not None:
            self._hook = conv.register_forward_hook(self._record_compute_dtype)

    def _record_compute_dtype(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.info["compute_dtype"] = _dtype_name(output.dtype)
        if self._hook is not None:
            self._hook.remove()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / STEPS_FILE
            atomic_write_json(path, {**self.info, "batch_seconds": [round(s, 4) for s in self.seconds]})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageMeter:
    """Pipeline probe: peak host memory (this process; worker processes separately) and peak GPU memory per stage.

    The host peak is reset before each stage through /proc/self/clear_refs (Linux); elsewhere it is the process's
    peak so far (``ru_maxrss``), which only grows from stage to stage.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float | None]] = {}

    @contextmanager
    def __call__(self, stage: Stage, cfg: DictConfig) -> Iterator[None]:
        resettable = _reset_peak_rss()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        yield
        self.records[stage.name] = {
            "host_peak_mb": round(_peak_rss_mb(), 1),
            "host_peak_is_stage": resettable,
            "workers_peak_mb": round(_kb_to_mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), 1),
            "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        }


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return _kb_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def _kb_to_mb(maxrss: int) -> float:
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def subset_root(source: str | Path, parent: Path, images: int) -> Path:
    """A VOC-layout folder of symlinks to the first ``images`` ids of ``train`` and of ``val`` of ``source``.

    Its train_aug (SegmentationClassAug ∪ train − val) is then exactly those train ids, so train ⊂ train_aug as on
    VOC, and every stage reads its splits unchanged. The folder name hashes the source and the chosen ids: another
    root, count or split list gives another ``data.root``, hence other stage configs; older folders are removed.
    A toy world's ``toy.json`` and background maps come along: its stages check the world's generation parameters
    there (instead of generating a world into the subset) and the demo reads each image's backgrounds.
    """
    source = validate_voc_root(source, need_aug=True).resolve()
    ids = {split: read_split(source, split)[:images] for split in ("train", "val")}
    empty = [split for split, chosen in ids.items() if not chosen]
    if empty:
        raise ValueError(f"data.root={source}: split(s) {empty} list no image; the preflight needs train and val")
    key = hashlib.sha256(json.dumps([str(source), ids]).encode()).hexdigest()[:8]
    dest = parent / f"voc_{images}_{key}"
    if dest.is_dir():
        return dest
    for old in parent.glob("voc_*"):
        shutil.rmtree(old)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, suffix in (
        ("JPEGImages", ".jpg"),
        ("Annotations", ".xml"),
        ("SegmentationClass", ".png"),
        ("SegmentationClassAug", ".png"),
        (BACKGROUND_DIR, ".png"),
    ):
        if not (source / folder).is_dir():
            continue
        (tmp / folder).mkdir(parents=True)
        for image_id in ids["train"] + ids["val"]:
            if (source / folder / f"{image_id}{suffix}").is_file():
                (tmp / folder / f"{image_id}{suffix}").symlink_to(source / folder / f"{image_id}{suffix}")
    if (source / TOY_META).is_file():
        (tmp / TOY_META).symlink_to(source / TOY_META)
    lists = tmp / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, chosen in ids.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in chosen))
    tmp.rename(dest)
    return dest


def dataset_classes(real: dict[str, DictConfig]) -> list[str] | None:
    """The run's class list: that of the first stage whose data config names one (the toy CLIP's renders name none)."""
    return next((list(c.data.classes) for c in real.values() if "data" in c and "classes" in c.data), None)


def ensure_toy_world(root: str | Path, real: dict[str, DictConfig]) -> None:
    """Generate the toy world into ``root`` when a stage reads it from there with toy generation options: a toy
    experiment's stages would generate it on first use, and the preflight takes its subset before any stage runs."""
    for stage_cfg in real.values():
        data = stage_cfg.get("data")
        if data is not None and data.get("toy") is not None and Path(str(data.root)) == Path(str(root)):
            generate_toy(root, **OmegaConf.to_container(data.toy, resolve=True))
            return


def training_overlay(real: DictConfig, images: int, steps: int) -> dict[str, Any]:
    """``pipeline.set`` overrides of a training stage with ``images`` training images: ``steps`` optimiser steps
    on batches capped at ``images``, validation (if the stage validates) once, at the end, and the step timer."""
    batch = min(int(real.data.batch_size), images)
    accumulate = int(real.trainer.get("accumulate_grad_batches") or 1)
    epochs = math.ceil(steps * accumulate / (images // batch))
    return {
        "trainer.max_steps": steps,
        "trainer.max_epochs": -1,
        "trainer.check_val_every_n_epoch": epochs,
        "trainer.log_every_n_steps": 1,
        "data.batch_size": batch,
        "+callbacks.preflight_timer": {"_target_": f"{__name__}.StepTimer"},
    }


def toyclip_overlay(steps: int) -> dict[str, Any]:
    """``pipeline.set`` overrides of the toy CLIP stage: ``steps`` optimiser steps (at least 2: one of warm-up) on
    its endless caption stream, the step timer, and a tiny held-out evaluation."""
    return {
        "trainer.max_steps": max(2, steps),
        "trainer.log_every_n_steps": 1,
        "model.optim.warmup_steps": 1,
        "toyclip.eval.per_kind": 2,
        "toyclip.eval.scenes": 4,
        "+callbacks.preflight_timer": {"_target_": f"{__name__}.StepTimer"},
    }


def weights_overlay(real: DictConfig, mode: str) -> tuple[dict[str, Any], list[str]]:
    """Overrides that switch a training stage's pretrained weights to random init (``random``, or ``auto`` when
    they are not on disk), and a line per weight source saying what the stage uses."""
    # (override key, its random-init value, architecture, pretrained source, whether that source is on disk)
    sources: list[tuple[str, Any, str, str, Callable[[], bool]]] = []
    net = OmegaConf.select(real, "model.net")
    if net is not None and net.get("pretrained") not in (None, False, "", "false", "False"):
        name = f"{net.backbone}.{net.pretrained_tag}" if net.pretrained is True else str(net.pretrained)
        sources.append(("model.net.pretrained", False, net.backbone, name, lambda: _trunk_on_disk(net)))
    clip = OmegaConf.select(real, "model.objective.evaluator")  # the CLIP the model builds (${clip}), if any
    if clip is not None and clip.get("pretrained") not in (None, ""):
        name = f"{clip.model} {clip.pretrained}"
        sources.append(("clip.pretrained", None, clip.model, name, lambda: _clip_on_disk(clip)))
    overlay: dict[str, Any] = {}
    said: list[str] = []
    for key, random_init, architecture, name, on_disk in sources:
        local = mode != "random" and on_disk()
        if mode == "random" or (mode == "auto" and not local):
            overlay[key] = random_init
            said.append(f"{architecture} random init" + (" (no local weights)" if mode == "auto" else ""))
        else:
            said.append(f"{name} ({'on disk' if local else 'download'})")
    return overlay, said


def _trunk_on_disk(net: DictConfig) -> bool:
    """timm weights of ``<backbone>.<tag>`` in the Hugging Face or torch hub cache, or a local weights file."""
    if net.pretrained is not True:
        return Path(str(net.pretrained)).is_file()
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(f"{net.backbone}.{net.pretrained_tag}")
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return True
    return bool(cfg.url) and (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()


def _clip_on_disk(clip: DictConfig) -> bool:
    import open_clip

    from clims_pl.models.clip_evaluator import cached_hub_file, register_tiny_configs

    if Path(str(clip.pretrained)).expanduser().is_file():
        return True
    register_tiny_configs()
    tag = open_clip.get_pretrained_cfg(clip.model, str(clip.pretrained))
    return bool(tag) and cached_hub_file(tag, clip.get("cache_dir")) is not None


def precision_text(stage_cfg: DictConfig, steps: dict[str, Any] | None) -> str:
    """What the stage computed in: the trainer's precision and dtypes (measured, for training stages), CLIP's
    dtype and the one it would use on CUDA (clip.precision ``auto`` → fp16 there)."""
    from clims_pl.models.clip_evaluator import resolve_precision

    parts = []
    if steps:
        parts.append(
            f"{steps['trainer_precision']} ({steps['param_dtype']} weights, {steps.get('compute_dtype', '?')} compute)"
        )
        if steps.get("clip_dtype"):
            cuda = resolve_precision(str(stage_cfg.clip.precision), "cuda")
            parts.append(f"CLIP {steps['clip_dtype']} (clip.precision={stage_cfg.clip.precision}; {cuda} on cuda)")
    elif OmegaConf.select(stage_cfg, "trainer.precision"):
        parts.append(str(stage_cfg.trainer.precision))
    elif OmegaConf.select(stage_cfg, "model.net"):
        parts.append("fp32")
    else:
        parts.append("—")  # no network (evaluation, report)
    return "; ".join(parts)


def estimate(
    stage: Stage,
    real: DictConfig,
    mini: DictConfig,
    wall_s: float,
    steps: dict[str, Any] | None,
    split_size: dict[str, int],
) -> tuple[str, float | None]:
    """(what was measured, estimated seconds of the real stage) from the preflight of one stage.

    Training: median batch time (first batch left out as warm-up) × real/preflight batch size × the real run's
    batches (max_steps × accumulation, or epochs × ⌊images / batch⌋). Per-image stages: wall time / images × the
    real split's images, an upper bound since model building is counted in. Other stages: none.
    """
    if steps and steps["batch_seconds"]:
        times = steps["batch_seconds"]
        per_batch = statistics.median(times[1:] or times)
        used, batch = int(mini.data.batch_size), int(real.data.batch_size)
        accumulate = int(real.trainer.get("accumulate_grad_batches") or 1)
        if int(real.trainer.max_steps) > 0:
            batches = int(real.trainer.max_steps) * accumulate
        else:
            batches = int(real.trainer.max_epochs) * (split_size[str(real.data.train_split)] // batch)
        what = f"{per_batch:.3f} s/batch of {used} → {batches:,} batches of {batch}"
        return what, per_batch * batch / used * batches
    key = PER_IMAGE_SPLIT.get(stage.target)
    if key is None:
        return "", None
    split = str(OmegaConf.select(mini, key))
    used = len(read_split(mini.data.root, split))
    return f"{wall_s / used:.3f} s/image × {split_size[split]:,} ({split})", wall_s / used * split_size[split]


def split_sizes(source: str | Path, classes: list[str] | None) -> dict[str, int]:
    """Images per split of the real run: the root's own counts, or VOC's where a VOC root holds fewer."""
    reference = VOC_SPLIT_SIZES if classes == list(VOC_CLASSES) else {}
    splits = {"train_aug", *(p.stem for p in (Path(source) / "ImageSets" / "Segmentation").glob("*.txt"))}
    return {split: max(len(read_split(source, split)), reference.get(split, 0)) for split in sorted(splits)}


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _gb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f}"


def render_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: a line of context, then one row per stage and the total."""
    lines = [
        f"# Preflight of {meta['task_name']}: {meta['images']} images per split, {meta['steps']} optimiser steps "
        f"per training stage, weights={meta['weights']}, device {meta['device']}",
        "",
        "| stage | wall | host peak GB | GPU peak GB | precision | weights | measured | full run (est.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['wall_s']:.1f} s | {_gb(r['host_peak_mb'])} | {_gb(r['gpu_peak_mb'])} | "
            f"{r['precision']} | {'; '.join(r['weights']) or '—'} | {r['measured'] or '—'} | "
            f"{_hms(r['estimate_s'])} |"
        )
    wall = sum(r["wall_s"] for r in rows)
    total = sum(r["estimate_s"] or 0.0 for r in rows)
    lines.append(f"| **total** | {wall:.1f} s | | | | | | {_hms(total)} |")
    lines += [
        "",
        "Estimates: training = median batch time (warm-up batch excluded, no data loading or validation) scaled to "
        "the real batch size and number of batches; per-image stages = wall time / images (includes model "
        "building, so an upper bound). They hold for this machine and device only.",
    ]
    return "\n".join(lines) + "\n"


def miniature(
    cfg: DictConfig, real: dict[str, DictConfig], run_dir: Path, data_root: Path
) -> tuple[DictConfig, dict[str, list[str]]]:
    """The pipeline config of the preflight (``pipeline.set`` overlay, run folder, data root) and, per stage, the
    weights it uses. ``real``: each stage's composed config in the real run."""
    overlay: dict[str, dict[str, Any]] = {}
    said: dict[str, list[str]] = {}
    for name, stage_cfg in real.items():
        overlay[name], said[name] = {}, []
        if not torch.cuda.is_available() and OmegaConf.select(stage_cfg, "trainer.accelerator") in ("gpu", "cuda"):
            overlay[name]["trainer.accelerator"] = "cpu"  # no GPU here: check everything else on the CPU
        spec = stage_spec(str(cfg.pipeline.stages[name].get("run") or name))
        if spec is REGISTRY["toyclip"]:
            overlay[name].update(toyclip_overlay(int(cfg.preflight_steps)))
        if spec is REGISTRY["train"]:
            weights, said[name] = weights_overlay(stage_cfg, str(cfg.preflight_weights))
            train_images = len(read_split(data_root, str(stage_cfg.data.train_split)))
            overlay[name].update(training_overlay(stage_cfg, train_images, int(cfg.preflight_steps)), **weights)
    mini = copy.deepcopy(cfg)
    with open_dict(mini):
        mini.preflight = False
        mini.run_dir = str(run_dir)
        mini.data.root = str(data_root)
        # pipeline.set describes the real run (the overlay was computed from it); the overlay comes last.
        mini.pipeline.set = OmegaConf.merge(OmegaConf.to_container(cfg.pipeline.set, resolve=True), overlay)
        for node in mini.pipeline.stages.values():
            if node is not None and node.get("dir"):
                node.dir = None  # a shared stage folder of the real runs stays untouched: use <run_dir>/<stage>
    return mini, said


def run_preflight(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run the experiment's stages in miniature in ``<run_dir>_preflight``; write and print the table."""
    images, steps, mode = int(cfg.preflight_images), int(cfg.preflight_steps), str(cfg.preflight_weights)
    if images < 1 or steps < 1:
        raise ValueError(f"preflight_images={images}, preflight_steps={steps}: both must be at least 1")
    if mode not in WEIGHTS:
        raise ValueError(f"preflight_weights={mode}: pick one of {', '.join(WEIGHTS)}")
    if cfg.pipeline.get("from_stage") or cfg.pipeline.get("only"):
        raise ValueError("preflight=true runs every stage afresh: drop --from/--only (pipeline.from_stage/only)")
    real_dir, root_dir = Path(str(cfg.run_dir)), Path(cfg.paths.root_dir)
    run_dir = real_dir.with_name(f"{real_dir.name}_preflight")
    common = [str(o) for o in cfg.pipeline.get("common") or ()]
    real = {
        s.name: compose_stage(s, s.folder(real_dir), root_dir, common)
        for s in stages_from_config(cfg.pipeline, default_wandb_group(cfg))
    }
    ensure_toy_world(cfg.data.root, real)
    mini, said = miniature(cfg, real, run_dir, subset_root(cfg.data.root, run_dir / "data", images))
    for name in real:
        shutil.rmtree(run_dir / name, ignore_errors=True)

    console.rule(f"preflight of {cfg.task_name} in {run_dir} ({images} images per split, {steps} steps)")
    meter = StageMeter()
    manifests = run(mini, probe=meter)

    sizes = split_sizes(cfg.data.root, dataset_classes(real))
    rows = []
    for stage in stages_from_config(mini.pipeline, default_wandb_group(mini)):
        mini_cfg = compose_stage(stage, stage.folder(run_dir), root_dir, common)
        steps_path = run_dir / stage.name / STEPS_FILE
        timer = json.loads(steps_path.read_text()) if steps_path.is_file() else None
        wall = float(manifests[stage.name]["wall_s"])
        measured, seconds = estimate(stage, real[stage.name], mini_cfg, wall, timer, sizes)
        rows.append(
            {
                "stage": stage.name,
                "wall_s": wall,
                **meter.records.get(stage.name, {}),
                "precision": precision_text(mini_cfg, timer),
                "weights": said[stage.name],
                "measured": measured,
                "estimate_s": None if seconds is None else round(seconds, 1),
            }
        )
    meta = {
        "task_name": str(cfg.task_name),
        "images": images,
        "steps": steps,
        "weights": mode,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (trainer.accelerator=cpu)",
        "data_root": str(cfg.data.root),
        "split_sizes": sizes,
        "torch": torch.__version__,
    }
    markdown = render_table(rows, meta)
    atomic_write_text(run_dir / "preflight.md", markdown)
    atomic_write_json(run_dir / "preflight.json", {**meta, "stages": rows})
    print(markdown)
    return manifests
