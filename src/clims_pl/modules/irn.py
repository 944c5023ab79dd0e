"""IRN boundary training (reference stage F, docs/reference.md#stage-f-irn-training): affinity loss from IR labels on a radius-10 path index."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from clims_pl.cams import strided_size
from clims_pl.data.affinity import affinity_labels
from clims_pl.models.irn import IRNet
from clims_pl.optim import poly_sgd
from clims_pl.refine.path_index import PathIndex, edge_to_affinity


def affinity_loss(
    affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor, eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """IRN's inter-pixel affinity loss (docs/reference.md#irn-network-and-loss), reductions as the reference (sums over batch, pairs, directions).

    pos pairs pull the affinity to 1 (−log(a + ε)), neg pairs push it to 0 (−log(1 + ε − a)); background and
    foreground positives are averaged separately then halved, so the larger set cannot dominate.
    total = (L_pos + L_neg) / 2 (the displacement terms are dropped, docs/reference.md#q17-displacement-branch-unused).
    """
    pos_term = -torch.log(affinity + eps)
    neg_term = -torch.log(1.0 + eps - affinity)
    bg_pos_loss = (bg_pos * pos_term).sum() / (bg_pos.sum() + eps)
    fg_pos_loss = (fg_pos * pos_term).sum() / (fg_pos.sum() + eps)
    pos_loss = bg_pos_loss / 2 + fg_pos_loss / 2
    neg_loss = (neg * neg_term).sum() / (neg.sum() + eps)
    return {
        "bg_pos": bg_pos_loss,
        "fg_pos": fg_pos_loss,
        "pos": pos_loss,
        "neg": neg_loss,
        "total": (pos_loss + neg_loss) / 2,
    }


class IRNModule(L.LightningModule):
    """Trains the boundary branch of ``net`` so that affinities (1 − max boundary on the path) match IR labels.

    Args:
        net: the IRNet (frozen backbone).
        num_classes: foreground classes; IR label values above it (255) mark unsure pixels.
        optim: ``lr``, ``weight_decay``, ``poly_power``, ``reference_momentum_bug``, ``momentum``
            (see :func:`clims_pl.optim.poly_sgd`; reference lr 0.1, wd 1e-4, quirk docs/reference.md#q1-polyoptimizer-momentum).
        crop_size: training crop; the path index lives on its ceil(crop/4) stride-4 grid.
        radius: path-index radius (reference 10 in training, 5 in the random walk).
    """

    def __init__(
        self, net: IRNet, num_classes: int, optim: dict[str, Any], crop_size: int = 512, radius: int = 10
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.grid = strided_size((crop_size, crop_size))[0]
        self.path_index = PathIndex(radius, (self.grid, self.grid))
        self._indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(src, dst, path indices) on ``device``, copied once. Not buffers: DDP would broadcast these ~200 MB
        of constants every step, and checkpoints need not store what (radius, crop_size) rebuild."""
        if device not in self._indices:
            index = self.path_index
            self._indices[device] = (
                torch.from_numpy(index.src_indices).to(device),
                torch.from_numpy(index.dst_indices).to(device),
                index.torch_path_indices(device),
            )
        return self._indices[device]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def losses(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Affinity losses of a batch: images (B, 3, S, S), stride-4 IR labels (B, S/4, S/4)."""
        edge = torch.sigmoid(self.net(image))
        if edge.shape[-2:] != (self.grid, self.grid) or label.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"edge {tuple(edge.shape[-2:])} / label {tuple(label.shape[-2:])} do not match the path-index grid "
                f"{self.grid}×{self.grid}: model.crop_size must equal data.crop_size"
            )
        src, dst, paths = self.indices(edge.device)
        affinity = edge_to_affinity(edge, paths)
        masks = affinity_labels(label, src, dst, self.hparams.num_classes)
        return affinity_loss(affinity, *masks)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch["image"], batch["label"])
        batch_size = len(batch["image"])
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "total"}, batch_size=batch_size)
        return losses["total"]

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.hparams.optim
        return poly_sgd(
            [{"params": self.net.param_groups(), "lr": cfg["lr"]}],
            weight_decay=cfg["weight_decay"],
            momentum=cfg["momentum"],
            reference_momentum_bug=cfg["reference_momentum_bug"],
            poly_power=cfg["poly_power"],
            max_steps=int(self.trainer.estimated_stepping_batches),
        )
