"""The stages of clims-pl: one module per command, each with a ``run(cfg)`` entry point, and the one registry of them.

Both the console scripts (:mod:`clims_pl.cli`) and the pipeline (:mod:`clims_pl.pipeline`) read :data:`REGISTRY`,
so an experiment names a stage by its registry name (``run: cams``) and gives only its overrides. Library modules
(data, models, modules, metrics, refine, ...) never import this package: the house is built bottom-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """What a registry name stands for: the root config in ``conf/``, the entry point, and one line on what it does."""

    config: str  # root config name in conf/ (train, infer, eval, ...)
    target: str  # "module:function" taking the composed config
    description: str

    def entry(self) -> Callable[..., Any]:
        """The ``run`` function, imported only now (a registry lookup must not import torch-heavy stage modules)."""
        module_name, func_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), func_name)


REGISTRY: dict[str, StageSpec] = {
    "train": StageSpec(
        "train", "clims_pl.stages.train:run", "train a model (CAM, CLIMS, IRN or DeepLab, as the experiment says)"
    ),
    "cams": StageSpec("infer", "clims_pl.stages.cams:run", "multi-scale CAMs of a split from a trained checkpoint"),
    "evaluate": StageSpec("eval", "clims_pl.stages.evaluate:run", "mIoU of CAMs (threshold sweep) or of label PNGs"),
    "ir_labels": StageSpec("refine", "clims_pl.stages.ir_labels:run", "IR labels for IRN: CAMs refined by a dense CRF"),
    "pseudo": StageSpec("refine", "clims_pl.stages.pseudo:run", "pseudo labels: CAMs random-walked on IRN boundaries"),
    "seg_eval": StageSpec(
        "refine", "clims_pl.stages.seg_eval:run", "DeepLab val mIoU (plain and CRF) and test-split export"
    ),
    "viz": StageSpec("viz", "clims_pl.stages.viz:run", "overlay panels of CAMs or of the refinement chain"),
    "toyclip": StageSpec(
        "toyclip",
        "clims_pl.stages.toyclip:run",
        "train the toy world's CLIP (train stage, experiment=toy_clip), export its open_clip file, evaluate it",
    ),
    "demo": StageSpec("demo", "clims_pl.stages.demo:run", "the toy demo's table: baseline CAM vs CLIMS and refinement"),
    "report": StageSpec("report", "clims_pl.stages.report:run", "the paper table: measured numbers beside the paper's"),
    "reproduce": StageSpec(
        "reproduce",
        "clims_pl.stages.reproduce:run_scored",
        "run an experiment's stages in order, skipping those up to date",
    ),
}


def stage_spec(name: str, where: str = "stage") -> StageSpec:
    """The registry entry ``name``, or a one-line error naming ``where`` it was asked for and the names that exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"{where}: no stage named {name!r} in clims_pl.stages.REGISTRY; one of {', '.join(REGISTRY)}"
        ) from None
