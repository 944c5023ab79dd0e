"""The toy world's CLIP teacher as a LightningModule: an open_clip model trained on toy captions (``clims-toyclip``).

No real CLIP can be downloaded offline, so the toy world gets its own: an open_clip model of a registered tiny
architecture (``clims-toy-rn`` by default, models/clip_configs) trained from scratch on the masked renders and
evidence captions of :mod:`clims_pl.data.toy_captions`, against the toy prompt bank's class and background prompts.
The trained ``.model`` is a plain open_clip model: ``clims_pl.stages.toyclip`` exports its state dict, which loads
through ``open_clip.create_model(name, pretrained=<file>)`` like a real CLIP checkpoint (``conf/clip/toyclip.yaml``).

**Loss.** With a handful of distinct captions, open_clip's ClipLoss would treat every duplicate caption in
a batch as a negative. :func:`multi_positive_loss` is the symmetric CLIP loss with soft targets instead:
image→concepts cross-entropy against the row-normalised evidence, plus concepts→images cross-entropy
against the column-normalised evidence. :func:`range_loss` pulls each cosine towards
``lo + (hi − lo)·e`` (default [0.1, 0.4]): contrastive training alone spreads cosines over [−1, 1], while real
CLIP similarities sit at ~0.15–0.35. The reference clamps OTM/BTM similarities at 1e-4 (negative cosines
silence their gradients) and thresholds CBS at 0.26, so the toy teacher is kept in that CLIP-like range.

The token embedding (49408 × width) stays at its random initialisation: only ~10 distinct prompts exist, and AdamW
over that table would dominate the step time. Why this tower: docs/toy_world.md ("The toy CLIP").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import open_clip
import torch
import torch.nn.functional as F

from clims_pl.data.toy_captions import toy_concepts
from clims_pl.models.clip_evaluator import register_tiny_configs


def multi_positive_loss(logits: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with soft, multiple positives: ½(KL image→concepts + KL concept→images).

    ``logits`` (B, K) = logit_scale·cos(image_b, concept_k); ``evidence`` (B, K) ≥ 0. Each row (image) is a
    softmax over the K concepts with target = its evidence normalised to sum 1; each column (concept) a
    softmax over the B images with target = that concept's evidence over the batch normalised. Rows/columns
    without evidence (a fully masked image, a concept absent from the batch) have no target and are skipped.
    KL = cross-entropy − target entropy: the same gradients, but 0 at the optimum, so the logged value says
    how far the teacher is from its targets (cross-entropy with several positives never reaches 0).
    """
    return 0.5 * (_soft_kl(logits, evidence) + _soft_kl(logits.T, evidence.T))


def _soft_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mass = target.sum(1)
    keep = mass > 0
    if not keep.any():
        return logits.sum() * 0.0
    p = target[keep] / mass[keep, None]
    return (torch.special.xlogy(p, p) - p * logits[keep].log_softmax(1)).sum(1).mean()


def range_loss(cosine: torch.Tensor, evidence: torch.Tensor, sim_range: Sequence[float]) -> torch.Tensor:
    """Mean squared distance of each cosine to ``lo + (hi − lo)·evidence``: keeps similarities CLIP-like."""
    lo, hi = float(sim_range[0]), float(sim_range[1])
    return ((cosine - (lo + (hi - lo) * evidence)) ** 2).mean()


def concept_features(model: torch.nn.Module, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
    """(K, D) unit text features, templates averaged and re-normalised as ClipEvaluator does."""
    feats = F.normalize(model.encode_text(tokens), dim=-1)
    if n_templates == 1:
        return feats
    return F.normalize(feats.view(-1, n_templates, feats.shape[-1]).mean(1), dim=-1)


class ToyClipModule(L.LightningModule):
    """Trains ``arch`` from scratch (weights drawn after the run's seed) on ``(teacher input, evidence)`` batches.

    Args:
        arch: registered open_clip architecture (``clims-toy-rn`` or ``clims-toy-vit``).
        prompts: prompt bank of the toy world whose class then background prompts are the concepts.
        optim: ``lr``, ``weight_decay`` (matrices only), ``warmup_steps`` (linear warm-up, then cosine to 0 at the
            trainer's last step).
        range_weight, sim_range: total loss = multi_positive_loss + range_weight · range_loss(sim_range).
    """

    def __init__(
        self, arch: str, prompts: str, optim: dict[str, Any], range_weight: float, sim_range: Sequence[float]
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        register_tiny_configs()
        self.model = open_clip.create_model(arch, pretrained=None)
        self.model.token_embedding.requires_grad_(False)
        concepts = toy_concepts(prompts)
        self.n_templates = len(concepts.bank.templates)
        tokens = open_clip.get_tokenizer(arch)([p for group in concepts.prompts for p in group])
        self.register_buffer("tokens", tokens, persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, ev = batch
        text = concept_features(self.model, self.tokens, self.n_templates)
        cos = F.normalize(self.model.encode_image(images), dim=-1) @ text.T
        contrastive = multi_positive_loss(self.model.logit_scale.exp() * cos, ev)
        calibration = range_loss(cos, ev, self.hparams.sim_range)
        loss = contrastive + float(self.hparams.range_weight) * calibration
        size = len(images)
        self.log("train/contrastive", contrastive, prog_bar=True, batch_size=size)
        self.log("train/range", calibration, prog_bar=True, batch_size=size)
        self.log("train/loss", loss, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the logit scale in [1, 100] after each step, as CLIP does."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with weight decay on matrices only (not norms, biases, the logit scale); per step a linear
        warm-up from lr/warmup to lr over ``warmup_steps`` (at least 1), then cosine annealing to 0."""
        optim = self.hparams.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(optim["weight_decay"])},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=float(optim["lr"]))
        total, warmup = int(self.trainer.estimated_stepping_batches), max(1, int(optim["warmup_steps"]))
        if not 0 < warmup < total:
            raise ValueError(f"model.optim.warmup_steps={warmup}: must be below trainer.max_steps={total}")
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup),
            ],
            milestones=[warmup],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
