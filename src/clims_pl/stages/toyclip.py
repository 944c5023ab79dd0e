"""``clims-toyclip``: train the toy world's CLIP (``clims-train experiment=toy_clip``), export it, evaluate it.

Training is the train stage's (loggers, ``checkpoints/last.ckpt``, resume, provenance); this stage then writes the
trained open_clip state dict to ``toyclip.export`` (atomically; what ``clip=toyclip`` loads) and its zero-shot
metrics to ``<output_dir>/metrics/toyclip.json``. Reuse across runs is the pipeline's: experiment=toy_demo keeps
the stage in a shared ``dir`` under the cache folder, skipped while its manifest is current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clims_pl.io import atomic_path, atomic_write_json
from clims_pl.runtime import log
from clims_pl.stages.train import fit
from clims_pl.toyclip import evaluate_toyclip


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the toy CLIP, export its open_clip state dict, evaluate it; return the metrics."""
    if cfg.toyclip.get("num_threads"):
        torch.set_num_threads(int(cfg.toyclip.num_threads))
    module, training = fit(cfg)
    export = Path(cfg.toyclip.export)
    with atomic_path(export) as tmp:
        torch.save(module.model.state_dict(), tmp)
    settings = OmegaConf.to_container(cfg.toyclip.eval, resolve=True)
    metrics = {
        **evaluate_toyclip(
            export, cfg.model.arch, cfg.model.prompts, instantiate(cfg.data.world), int(cfg.data.cam_stride), settings
        ),
        "training": {**training, "export": str(export)},
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "metrics" / "toyclip.json", metrics)
    sims = metrics["sims"]
    log.info(
        "toyclip %s: objects alone %.1f%%, scenes %.1f%%, backgrounds %.1f%%; cos(fg crop, class) median %.3f "
        "[p05 %.3f], cos(bg crop, class) median %.3f [p95 %.3f]",
        export,
        100 * metrics["object_alone_acc"],
        100 * metrics["scene_object_acc"],
        100 * metrics["background_acc"],
        sims["fg_crop_vs_own_class"]["median"],
        sims["fg_crop_vs_own_class"]["p05"],
        sims["bg_crop_vs_own_class"]["median"],
        sims["bg_crop_vs_own_class"]["p95"],
    )
    return metrics
