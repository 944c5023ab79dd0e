"""DeepLab-v2 training on pseudo labels (reference stage I, docs/reference.md#deeplab-training) and its validation metric (docs/reference.md#deeplab-test-and-crf).

Loss: class-balanced cross-entropy (``main_v2``) summed over the four MSC outputs, labels resized to each output
with nearest sampling of pixel centres (= PIL NEAREST). Optimiser: SGD momentum 0.9, wd 5e-4, lr ×1 backbone
conv weights / ×10 ASPP weights / ×20 ASPP biases (wd 0), poly decay updated every 10 iterations.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from clims_pl.metrics import deeplab_scores
from clims_pl.models.deeplab import DeepLabV2
from clims_pl.optim import poly_sgd


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """(mean CE over background pixels + mean CE over foreground pixels) / 2 (reference ``criterion_balance``).

    docs/reference.md#q21-balanced-ce-division guard, always on: each mean divides by max(count, 1), so a batch without foreground (or background)
    pixels contributes 0 for that half instead of the reference's 0/0 = NaN. With both sets non-empty the value
    is exactly the reference's.
    """
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    background = labels == 0
    foreground = (labels != 0) & (labels != ignore_index)
    loss_bg = (ce * background).sum() / background.sum().clamp_min(1)
    loss_fg = (ce * foreground).sum() / foreground.sum().clamp_min(1)
    return (loss_bg + loss_fg) / 2


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer labels → (B, h, w) by nearest pixel-centre sampling, identical to PIL NEAREST.

    The reference passes (H, W) where PIL expects (W, H) (docs/reference.md#q26-label-resize-order); that is harmless for its square crops and
    we pass the size the right way round.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].long()


class SegModule(L.LightningModule):
    """Trains DeepLab-v2 MSC on label PNGs; validates with single-pass MSC-max logits (no CRF) → ``val/miou``.

    Args:
        net: the DeepLabV2 network.
        optim: ``lr`` (2.5e-4), ``momentum`` (0.9), ``weight_decay`` (5e-4), ``poly_power`` (0.9), ``lr_step``
            (10: lr updated every 10 steps), ``aspp_weight_lr_mult`` (10), ``aspp_bias_lr_mult`` (20).
        loss: ``balanced`` (reference ImageNet-init ``main_v2``) or ``ce`` (plain CE, ``main.py``).
        ignore_index: label value excluded from loss and metrics.
    """

    def __init__(
        self,
        net: DeepLabV2,
        optim: dict[str, Any],
        loss: Literal["balanced", "ce"] = "balanced",
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if loss not in ("balanced", "ce"):
            raise ValueError(f"model.loss must be 'balanced' or 'ce', got {loss!r}")
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        num_outputs = net.aspp.convs[0].out_channels
        self.val_confusion = MulticlassConfusionMatrix(num_outputs, ignore_index=ignore_index)

    def setup(self, stage: str) -> None:
        """Refuse data normalised for the other trunk (Caffe weights on ImageNet-normalised RGB, or the reverse)."""
        normalization = getattr(getattr(self.trainer, "datamodule", None), "normalization", None)
        if normalization not in (None, self.net.input_normalization):
            raise ValueError(
                f"data.normalization={normalization} does not fit model.net.trunk={self.net.trunk}, whose weights "
                f"expect data.normalization={self.net.input_normalization}"
            )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        return self.net(image)

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "balanced":
            return balanced_cross_entropy(logits, labels, self.hparams.ignore_index)
        return F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self.net(batch["image"])
        losses = [self.criterion(out, resize_labels(batch["label"], out.shape[-2:])) for out in outputs]
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = batch["label"]
        logits = F.interpolate(self.net(batch["image"]), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        self.val_confusion.update(logits.argmax(dim=1), labels)

    def on_validation_epoch_end(self) -> None:
        scores = deeplab_scores(self.val_confusion.compute().cpu().numpy())
        self.val_confusion.reset()
        if scores["miou"] is not None:
            self.log("val/miou", scores["miou"], prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.hparams.optim
        backbone, aspp_weights, aspp_biases = self.net.param_groups()
        lr, wd = cfg["lr"], cfg["weight_decay"]
        max_steps = int(self.trainer.estimated_stepping_batches)
        return poly_sgd(
            [
                {"params": backbone, "lr": lr},
                {"params": aspp_weights, "lr": lr * cfg["aspp_weight_lr_mult"]},
                {"params": aspp_biases, "lr": lr * cfg["aspp_bias_lr_mult"], "weight_decay": 0.0},
            ],
            weight_decay=wd,
            momentum=cfg["momentum"],
            reference_momentum_bug=False,  # main_v2's SGD passes momentum by name: 0.9 as intended
            poly_power=cfg["poly_power"],
            max_steps=max_steps,
            every=cfg["lr_step"],
            final_step=max_steps,
        )
