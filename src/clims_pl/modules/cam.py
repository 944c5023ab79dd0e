"""Baseline CAM classifier (reference stage A, docs/reference.md#stage-a-baseline-cam): multilabel soft-margin loss on GAP logits."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MultilabelAveragePrecision

from clims_pl.models.cam_net import CAMNet
from clims_pl.optim import cam_net_optimizer


class CAMModule(L.LightningModule):
    """Trains ``net`` as an image classifier; its per-pixel logits are the baseline CAMs.

    Args:
        net: the CAMNet (FixedBN for the reference baseline).
        optim: ``lr`` (backbone), ``classifier_lr_mult``, ``weight_decay``, ``poly_power``,
            ``reference_momentum_bug``, ``momentum`` — see :func:`clims_pl.optim.poly_sgd`.
    """

    def __init__(self, net: CAMNet, optim: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.val_map = MultilabelAveragePrecision(num_labels=net.num_classes, average="macro")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.classify(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.net.classify(batch["image"])
        loss = F.multilabel_soft_margin_loss(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.net.classify(batch["image"])
        loss = F.multilabel_soft_margin_loss(logits, batch["label"])
        self.val_map.update(logits, batch["label"].long())
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.log("val/mAP", self.val_map, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """Reference docs/reference.md#stage-a-baseline-cam: backbone lr 0.1, classifier ×10, L2 1e-4, poly 0.9, momentum quirk docs/reference.md#q1-polyoptimizer-momentum."""
        return cam_net_optimizer(self.net, self.hparams.optim, int(self.trainer.estimated_stepping_batches))
