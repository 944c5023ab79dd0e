"""The reference optimiser: SGD with a per-step polynomial learning-rate decay (docs/reference.md#polyoptimizer).

The reference ``PolyOptimizer`` subclasses SGD and passes ``weight_decay`` positionally into SGD's *momentum*
slot, so every group runs with momentum = 1e-4 (quirk docs/reference.md#q1-polyoptimizer-momentum, [FAITHFUL]). ``reference_momentum_bug=True`` reproduces
that; ``False`` uses the intended ``momentum`` (0.9) and changes the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from clims_pl.models.cam_net import CAMNet


def poly_factor(step: int, max_steps: int, power: float, every: int = 1, final_step: int | None = None) -> float:
    """lr multiplier before update ``step`` (0-based): (1 − k/T)^power, k = ``step`` rounded down to a multiple of
    ``every`` and frozen from ``final_step`` on.

    CAM/CLIMS (reference ``PolyOptimizer``): every step, frozen at T − 1 (the default). DeepLab (reference
    ``PolynomialLR``): ``every=10``, ``final_step=T`` (the factor reaches 0 at T).
    """
    k = min(step // every * every, max_steps - 1 if final_step is None else final_step)
    return (1.0 - k / max_steps) ** power


def poly_sgd(
    param_groups: list[dict[str, Any]],
    *,
    weight_decay: float,
    momentum: float = 0.9,
    reference_momentum_bug: bool = True,
    poly_power: float = 0.9,
    max_steps: int,
    every: int = 1,
    final_step: int | None = None,
) -> dict[str, Any]:
    """SGD + per-step poly schedule, as a ``configure_optimizers`` return value.

    Each group carries its own ``lr`` (backbone 1×, classifier 10× in the reference) and may carry its own
    ``weight_decay`` (else ``weight_decay``: coupled L2 on every group, as in the reference); ``every`` and
    ``final_step`` as in :func:`poly_factor`.
    """
    if max_steps <= 0:
        raise ValueError(f"poly schedule needs max_steps > 0, got {max_steps} (is the train dataloader empty?)")
    groups = [{**g, "weight_decay": g.get("weight_decay", weight_decay)} for g in param_groups if g["params"]]
    effective_momentum = weight_decay if reference_momentum_bug else momentum
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=effective_momentum)
    scheduler = LambdaLR(optimizer, lambda t: poly_factor(t, max_steps, poly_power, every, final_step))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def cam_net_optimizer(net: CAMNet, cfg: Mapping[str, Any], max_steps: int) -> dict[str, Any]:
    """Reference groups for CAM and CLIMS (docs/reference.md#stage-a-baseline-cam, docs/reference.md#clims-setup): trainable backbone at ``lr``, classifier at ``lr × mult``."""
    backbone, classifier = net.param_groups()
    return poly_sgd(
        [
            {"params": backbone, "lr": cfg["lr"]},
            {"params": classifier, "lr": cfg["lr"] * cfg["classifier_lr_mult"]},
        ],
        weight_decay=cfg["weight_decay"],
        momentum=cfg["momentum"],
        reference_momentum_bug=cfg["reference_momentum_bug"],
        poly_power=cfg["poly_power"],
        max_steps=max_steps,
    )
