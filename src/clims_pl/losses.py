"""The CLIMS objective (docs/reference.md#clims-training-step, step 8): one function per loss term, and their weighted sum.

Similarities arrive in CLIP's precision (fp16 in the reference) and every term is computed in that precision,
as the reference does: in fp16 the upper clamp 0.9999 rounds to 1.0, which is harmless since similarities sit
around 0.2–0.35 (docs/reference.md#clims-fidelity-checklist). The weighted sum then promotes to fp32 when L_REG (fp32) is added, also as reference.
"""

from __future__ import annotations

import torch
from torch import nn

from clims_pl.config import check_number
from clims_pl.models.clip_evaluator import ClipEvaluator
from clims_pl.prompts.bank import PromptBank

#: Clamp of the OTM/BTM similarities before the log (reference SimMaxLoss / SimMinLoss).
SIM_MIN, SIM_MAX = 1e-4, 0.9999
TERMS = ("otm", "btm", "cbs", "reg")


def otm_loss(s_fg: torch.Tensor) -> torch.Tensor:
    """Object-text matching, L_OTM = mean_k −log(clamp(s_k^fg, 1e-4, 0.9999)) (docs/reference.md#clims-training-step, margin 0).

    Pulls each foreground crop towards its class prompt.
    """
    return -torch.log(s_fg.clamp(SIM_MIN, SIM_MAX)).mean()


def btm_loss(s_bg: torch.Tensor) -> torch.Tensor:
    """Background-text matching, L_BTM = mean_k −log(1 − clamp(s_k^bg, 1e-4, 0.9999)) (docs/reference.md#clims-training-step, margin 0).

    Pushes the background crop (1 − CAM) ⊙ image away from the class prompt, so the CAM must cover the whole object.
    """
    return -torch.log(1 - s_bg.clamp(SIM_MIN, SIM_MAX)).mean()


def cbs_loss(s_fg_bg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Co-occurring background suppression, L_CBS = Σ_{k,b} 1[S_kb > τ] · −log(1 − S_kb) (docs/reference.md#clims-training-step, quirk docs/reference.md#q5-cbs-is-a-sum).

    A SUM over the K×B (crop, background prompt) pairs with a hard, gradient-free mask and no clamp, so its size
    grows with K; the reference default τ is 0.26 on VOC.
    """
    mask = (s_fg_bg > threshold).to(s_fg_bg.dtype)
    return (mask * -torch.log(1 - s_fg_bg)).sum()


def area_reg(maps: torch.Tensor) -> torch.Tensor:
    """Area regulariser, L_REG = mean of the sigmoid maps over ALL N×C×h×w entries (docs/reference.md#clims-training-step, quirk docs/reference.md#q4-reg-over-all-classes).

    Absent classes are included: their maps get gradient only from this term, which pushes them to 0.
    """
    return maps.mean()


class ClimsObjective(nn.Module):
    """α·L_OTM + β·L_BTM + γ·L_CBS + δ·L_REG, with CLIP similarities from ``evaluator``.

    A term whose weight is 0 or whose ``enable_*`` switch is off is left out of the total (not multiplied by 0:
    an unclamped CBS could be inf). Reference weights ``--hyper 10,24,1,0.2``, CBS threshold 0.26.
    """

    def __init__(
        self,
        evaluator: ClipEvaluator,
        alpha: float = 10.0,
        beta: float = 24.0,
        gamma: float = 1.0,
        delta: float = 0.2,
        cbs_threshold: float = 0.26,
        enable_otm: bool = True,
        enable_btm: bool = True,
        enable_cbs: bool = True,
        enable_reg: bool = True,
    ) -> None:
        super().__init__()
        self.evaluator = evaluator
        # Config keys as in conf/loss; a negative weight would turn its term into a reward and still exit 0.
        given = {
            "otm": ("alpha", alpha, enable_otm),
            "btm": ("beta", beta, enable_btm),
            "cbs": ("gamma", gamma, enable_cbs),
            "reg": ("delta", delta, enable_reg),
        }
        self.weights = {}
        for term, (key, value, enabled) in given.items():
            weight = check_number(f"loss.{key}", value, ge=0)
            self.weights[term] = weight if enabled else 0.0
        # Similarities are cosines: a threshold outside (-1, 1) would keep L_CBS always on or always off.
        self.cbs_threshold = check_number(
            "loss.cbs_threshold", cbs_threshold, gt=-1, lt=1, hint="a CLIP cosine similarity; the reference uses 0.26"
        )

    @property
    def uses_cbs(self) -> bool:
        return self.weights["cbs"] != 0

    def set_prompt_bank(self, bank: PromptBank) -> None:
        """Hand the bank's prompts to the evaluator; CBS needs background concepts."""
        if self.uses_cbs and not bank.background:
            raise ValueError(
                f"{bank.source}: 'background' is empty but L_CBS is on (loss.gamma={self.weights['cbs']}); "
                "add background concepts to the bank or set loss.gamma=0"
            )
        self.evaluator.set_prompts(bank.class_prompts(), bank.background_prompts() if self.uses_cbs else [])

    def forward(self, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms, ``total`` and diagnostics for sigmoid ``maps`` (N,C,h,w), ``images`` (N,3,H,W), ``labels`` (N,C).

        Diagnostics (detached): ``sim_fg`` / ``sim_bg`` mean positive-pair similarity, ``cbs_active`` fraction of
        (crop, background prompt) pairs above the CBS threshold, ``pairs`` K.
        """
        scores = self.evaluator(maps, images, labels, with_background=self.uses_cbs)
        zero = maps.new_zeros(())
        has_pairs = scores.s_fg.numel() > 0
        terms = {
            "otm": otm_loss(scores.s_fg) if has_pairs else zero,
            "btm": btm_loss(scores.s_bg) if has_pairs else zero,
            "cbs": cbs_loss(scores.s_fg_bg, self.cbs_threshold) if has_pairs and self.uses_cbs else zero,
            "reg": area_reg(maps),
        }
        active = [self.weights[k] * terms[k] for k in TERMS if self.weights[k] != 0]
        total = sum(active[1:], active[0]) if active else zero
        with torch.no_grad():
            diagnostics = {
                "sim_fg": scores.s_fg.float().mean() if has_pairs else zero,
                "sim_bg": scores.s_bg.float().mean() if has_pairs else zero,
                "cbs_active": (scores.s_fg_bg > self.cbs_threshold).float().mean()
                if has_pairs and self.uses_cbs
                else zero,
                "pairs": maps.new_tensor(float(scores.s_fg.numel())),
            }
        return {**terms, "total": total, **diagnostics}
