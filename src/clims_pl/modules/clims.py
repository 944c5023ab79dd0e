"""CLIMS training (reference stage B, docs/reference.md#stage-b-clims-training): sigmoid CAMs taught by a frozen CLIP through the four losses.

The network starts from a baseline CAM checkpoint (stage A) and trains with ordinary BatchNorm in train mode
(quirk docs/reference.md#q6-trainable-batchnorm); there is no classification loss. CLIP is not trained and not checkpointed: its weights are rebuilt
from the ``clip`` config on load, so checkpoints stay the size of the CAM network and carry no CLIP copy that
could drift from the config.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from clims_pl.losses import TERMS, ClimsObjective
from clims_pl.models.cam_net import CAMNet
from clims_pl.models.checkpoint import load_weights
from clims_pl.optim import cam_net_optimizer

_CLIP_PREFIX = "objective.evaluator."


class ClimsModule(L.LightningModule):
    """Trains ``net`` so that CLIP matches its sigmoid maps to the class prompts.

    Args:
        net: CAMNet with ``bn_mode="train"`` (reference ``resnet50_clims``).
        objective: the weighted losses with their frozen CLIP evaluator.
        optim: ``lr`` (backbone), ``classifier_lr_mult``, ``weight_decay``, ``poly_power``,
            ``reference_momentum_bug``, ``momentum`` — see :func:`clims_pl.optim.poly_sgd`.
        init_ckpt: baseline CAM checkpoint (clims-pl, or the reference's ``res50_cam.pth``), loaded strictly.
        allow_random_init: accept ``init_ckpt=None`` and train from ``net``'s own init (tests only).
    """

    def __init__(
        self,
        net: CAMNet,
        objective: ClimsObjective,
        optim: dict[str, Any],
        init_ckpt: str | None = None,
        allow_random_init: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "objective"])
        self.net = net
        self.objective = objective
        _load_init(net, init_ckpt, allow_random_init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Training-time CAMs: sigmoid of the per-pixel logits (N, C, h/16, w/16) (docs/reference.md#q7-training-vs-inference-cams)."""
        return torch.sigmoid(self.net(image))

    def setup(self, stage: str) -> None:
        """Take the prompt bank from the datamodule; text embeddings are encoded once, on the first step."""
        datamodule = getattr(self.trainer, "datamodule", None)
        bank = getattr(datamodule, "prompt_bank", None)
        if bank is None:
            raise ValueError("ClimsModule needs a datamodule with a .prompt_bank (data.prompts in the config)")
        if len(bank.classes) != self.net.num_classes:
            raise ValueError(
                f"prompt bank {bank.source} has {len(bank.classes)} classes but model.net.num_classes="
                f"{self.net.num_classes}"
            )
        self.objective.set_prompt_bank(bank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        out = self.objective(self(images), images, batch["label"])
        n = len(images)
        self.log("train/loss", out["total"], prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": out[k].float() for k in TERMS}, batch_size=n)
        self.log_dict({f"train/{k}": out[k] for k in ("sim_fg", "sim_bg", "cbs_active", "pairs")}, batch_size=n)
        return out["total"]

    def configure_optimizers(self) -> dict[str, Any]:
        """Reference docs/reference.md#clims-setup: backbone lr, classifier ×10, L2 1e-4, poly 0.9, momentum quirk docs/reference.md#q1-polyoptimizer-momentum. CLIP is excluded."""
        return cam_net_optimizer(self.net, self.hparams.optim, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop CLIP's weights: they are rebuilt from the config, and are never trained."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_CLIP_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the config-built CLIP weights back so the strict load of the rest still checks every key."""
        checkpoint["state_dict"].update(self.objective.evaluator.state_dict(prefix=_CLIP_PREFIX))


def _load_init(net: CAMNet, init_ckpt: str | os.PathLike | None, allow_random_init: bool) -> None:
    """Strictly load the baseline CAM weights into ``net`` (docs/reference.md#clims-setup loads res50_cam.pth strictly): a clims-pl
    checkpoint or the reference's own ``res50_cam.pth`` (any layout :mod:`clims_pl.models.checkpoint` knows)."""
    if init_ckpt is None:
        if allow_random_init:
            return
        raise ValueError(
            "model.init_ckpt is required: CLIMS starts from a baseline CAM checkpoint (train one with "
            "`clims-train experiment=toy_cam` / `paper_voc_cam`, then pass model.init_ckpt=<run>/checkpoints/last.ckpt)"
        )
    load_weights(net, init_ckpt, "model.init_ckpt")
