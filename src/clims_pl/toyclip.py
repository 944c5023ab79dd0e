"""Zero-shot evaluation of the toy world's CLIP teacher (trained by :mod:`clims_pl.modules.toyclip`).

Zero-shot accuracies and similarity ranges on held-out renders (another seed than training) are measured through
:class:`~clims_pl.models.clip_evaluator.ClipEvaluator`, i.e. the exact CLIMS scoring path, from the exported
open_clip state dict that ``clip=toyclip`` loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clims_pl.data.toy import TOY_CLASSES, ToyWorld
from clims_pl.data.toy_captions import Concepts, concept_regions, toy_concepts
from clims_pl.data.transforms import imagenet_normalize
from clims_pl.models.clip_evaluator import ClipEvaluator


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().float().flatten()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95]))
    return {"min": float(v.min()), "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def _normalised(rgbs: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([imagenet_normalize(x) for x in rgbs])).permute(0, 3, 1, 2).contiguous()


@dataclass
class WholeImageScores:
    """Cosines of unmasked images to every class prompt (N, C) and every background prompt (N, B)."""

    classes: torch.Tensor
    backgrounds: torch.Tensor


def _whole_image_scores(evaluator: ClipEvaluator, images: torch.Tensor, num_classes: int) -> WholeImageScores:
    """Score whole images through the evaluator: all-ones maps and labels make every fg crop the image."""
    n, _, h, w = images.shape
    labels = torch.ones(n, num_classes)
    scores = evaluator(torch.ones(n, num_classes, h, w), images, labels)
    return WholeImageScores(scores.s_fg.view(n, num_classes), scores.s_fg_bg.view(n, num_classes, -1)[:, 0])


@torch.no_grad()
def evaluate_toyclip(
    checkpoint: str | Path, arch: str, prompts: str, world: ToyWorld, cam_stride: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Zero-shot accuracies and CLIMS similarity ranges of the open_clip state dict ``checkpoint`` on held-out
    renders of ``world`` (``settings``: seed, per_kind, scenes, cbs_threshold), via ClipEvaluator.

    * ``object_alone_acc``: render_object images → argmax over class prompts is its class.
    * ``scene_object_acc``: dataset-like render_scene images → argmax over class prompts is a present class.
    * ``background_acc``: render_background of each named background → argmax over background prompts.
    * ``sims``: on scenes, with "perfect CAMs" (each present class's mask pooled to stride 16): fg crop vs its
      class prompt (OTM), bg crop vs the same prompt (BTM), fg crop vs background prompts (CBS, with the share
      above the 0.26 threshold); background-alone images vs their own prompt and vs class prompts.
    """
    concepts = toy_concepts(prompts)
    rng = np.random.default_rng([int(settings["seed"]), 0, 2])
    evaluator = ClipEvaluator(arch, pretrained=str(checkpoint), precision="fp32", normalize="reference")
    evaluator.set_prompts(concepts.bank.class_prompts(), concepts.bank.background_prompts())
    c, per = concepts.num_classes, int(settings["per_kind"])
    # Objects alone, per class in bank order.
    objects = [world.render_object(name, rng)[0] for name in concepts.bank.classes for _ in range(per)]
    obj_truth = torch.arange(c).repeat_interleave(per)
    obj = _whole_image_scores(evaluator, _normalised(objects), c)
    # Backgrounds alone, per named background.
    bgs = [world.render_background(name, rng) for name in concepts.bank.background for _ in range(per)]
    bg_truth = torch.arange(len(concepts.bank.background)).repeat_interleave(per)
    bg = _whole_image_scores(evaluator, _normalised(bgs), c)
    # Dataset-like scenes.
    scenes = [world.render_scene(rng) for _ in range(int(settings["scenes"]))]
    images = _normalised([s.rgb for s in scenes])
    whole = _whole_image_scores(evaluator, images, c)
    present = torch.zeros(len(scenes), c)
    for i, s in enumerate(scenes):
        present[i, [concepts.world_class(k) for k in s.class_indices]] = 1
    scene_hit = present.gather(1, whole.classes.argmax(1, keepdim=True)).squeeze(1)
    maps = _perfect_cams(scenes, concepts, int(cam_stride))
    crops = evaluator(maps, images, present)
    threshold = float(settings["cbs_threshold"])
    own_bg = bg.backgrounds.gather(1, bg_truth.view(-1, 1)).squeeze(1)
    return {
        "object_alone_acc": float((obj.classes.argmax(1) == obj_truth).float().mean()),
        "scene_object_acc": float(scene_hit.mean()),
        "background_acc": float((bg.backgrounds.argmax(1) == bg_truth).float().mean()),
        "sims": {
            "fg_crop_vs_own_class": _summary(crops.s_fg),
            "bg_crop_vs_own_class": _summary(crops.s_bg),
            "fg_crop_vs_background_prompts": _summary(crops.s_fg_bg),
            "fg_crop_background_above_threshold": float((crops.s_fg_bg > threshold).float().mean()),
            "background_alone_vs_own_prompt": _summary(own_bg),
            "background_alone_above_threshold": float((own_bg > threshold).float().mean()),
            "background_alone_vs_class_prompts": _summary(bg.classes),
            "object_alone_vs_own_class": _summary(obj.classes.gather(1, obj_truth.view(-1, 1))),
        },
        "eval": {"seed": int(settings["seed"]), "per_kind": per, "scenes": len(scenes), "cbs_threshold": threshold},
    }


def _perfect_cams(scenes: Sequence[Any], concepts: Concepts, stride: int) -> torch.Tensor:
    """(N, C, ⌈S/stride⌉, ⌈S/stride⌉) maps = each class's ground-truth area fraction per CAM cell."""
    size = scenes[0].mask.shape[0]
    cells = math.ceil(size / stride)
    masks = torch.from_numpy(np.stack([s.mask for s in scenes])).long()
    world_to_bank = torch.tensor([concepts.world_class(i) for i in range(len(TOY_CLASSES))])
    codes = torch.where(
        (masks >= 1) & (masks <= len(TOY_CLASSES)), world_to_bank[(masks - 1).clamp(0, len(TOY_CLASSES) - 1)], -1
    )
    return concept_regions(codes, concepts.num_classes, cells)
