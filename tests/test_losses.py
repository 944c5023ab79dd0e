"""The four CLIMS losses against hand-computed values (docs/reference.md#clims-training-step), and their weighted sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clims_pl.losses import ClimsObjective, area_reg, btm_loss, cbs_loss, otm_loss
from clims_pl.models.clip_evaluator import ClipScores
from clims_pl.prompts.bank import PromptBank

# The clamp limits as fp32 holds them (0.9999 is 0.99989998... in fp32, so 1 − 0.9999 ≈ 1.00017e-4).
CLAMP_MIN, CLAMP_MAX = float(np.float32(1e-4)), float(np.float32(0.9999))
LOG_CLAMP_MIN = -math.log(CLAMP_MIN)  # −log clamp_min ≈ 9.2103
LOG_CLAMP_MAX = -math.log(CLAMP_MAX)  # −log clamp_max ≈ 1.0002e-4
LOG_ONE_MINUS_MAX = -math.log(1 - CLAMP_MAX)  # ≈ 9.2101
LOG_ONE_MINUS_MIN = -math.log(1 - CLAMP_MIN)  # ≈ 1.0e-4


def test_otm_clamps_then_means():
    s = torch.tensor([0.5, 0.0, 1.0, 0.25])
    expected = (math.log(2) + LOG_CLAMP_MIN + LOG_CLAMP_MAX + math.log(4)) / 4
    assert otm_loss(s).item() == pytest.approx(expected, rel=1e-6)


def test_btm_clamps_then_means():
    s = torch.tensor([0.5, 0.0, 1.0, -0.3])
    # 1 − clamp(s): 0.5, 1 − 1e-4, 1 − 0.9999, 1 − 1e-4
    expected = (math.log(2) + LOG_ONE_MINUS_MIN + LOG_ONE_MINUS_MAX + LOG_ONE_MINUS_MIN) / 4
    assert btm_loss(s).item() == pytest.approx(expected, rel=1e-6)


def test_otm_fp16_upper_clamp_rounds_to_one():
    # docs/reference.md#clims-fidelity-checklist: cast to half, 0.9999 becomes 1.0, so a perfect match costs exactly 0 in fp16 (1e-4 in fp32).
    assert otm_loss(torch.tensor([1.0], dtype=torch.float16)).item() == 0.0
    assert otm_loss(torch.tensor([1.0])).item() == pytest.approx(LOG_CLAMP_MAX, rel=1e-4)


def test_cbs_is_a_thresholded_sum_without_clamp():
    near_one = 1 - 2**-16  # exact in fp32; above the OTM/BTM clamp limit, and CBS must not clamp it
    s = torch.tensor([[0.3, 0.26], [0.1, 0.5], [near_one, -0.2]], requires_grad=True)
    loss = cbs_loss(s, threshold=0.26)
    # 0.26 itself is not above the threshold.
    expected = -math.log(1 - np.float32(0.3)) - math.log(0.5) + 16 * math.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dS −log(1−S) = 1/(1−S) where the hard mask is on, 0 elsewhere (the mask carries no gradient).
    expected_grad = torch.tensor([[1 / 0.7, 0.0], [0.0, 2.0], [2.0**16, 0.0]])
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-6, atol=0)


def test_area_reg_means_over_every_entry():
    maps = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2) / 24
    assert area_reg(maps).item() == pytest.approx(11.5 / 24)


class _FixedScores(nn.Module):
    """Stands in for ClipEvaluator: returns given similarities and records what it was asked."""

    def __init__(self, s_fg, s_bg, s_fg_bg):
        super().__init__()
        self.scores = (torch.tensor(s_fg), torch.tensor(s_bg), torch.tensor(s_fg_bg))
        self.calls: list[bool] = []
        self.prompts = None

    def forward(self, maps, images, labels, *, with_background):
        self.calls.append(with_background)
        s_fg, s_bg, s_fg_bg = self.scores
        idx = torch.zeros(len(s_fg), dtype=torch.long)
        return ClipScores(s_fg, s_bg, s_fg_bg if with_background else None, idx, idx)

    def set_prompts(self, class_prompts, background_prompts):
        self.prompts = (class_prompts, background_prompts)


def _objective(**kwargs):
    evaluator = _FixedScores([0.5, 0.25], [0.5, 0.75], [[0.3, 0.1], [0.5, 0.2]])
    return evaluator, ClimsObjective(evaluator, **kwargs)


def _inputs():
    maps = torch.full((2, 3, 2, 2), 0.25)
    return maps, torch.zeros(2, 3, 8, 8), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])


def test_objective_weighted_sum_and_diagnostics():
    evaluator, objective = _objective()
    out = objective(*_inputs())
    otm = (math.log(2) + math.log(4)) / 2
    btm = (math.log(2) + math.log(4)) / 2
    cbs = -math.log(0.7) - math.log(0.5)
    reg = 0.25
    assert out["otm"].item() == pytest.approx(otm, rel=1e-6)
    assert out["btm"].item() == pytest.approx(btm, rel=1e-6)
    assert out["cbs"].item() == pytest.approx(cbs, rel=1e-6)
    assert out["total"].item() == pytest.approx(10 * otm + 24 * btm + 1 * cbs + 0.2 * reg, rel=1e-6)
    assert out["sim_fg"].item() == pytest.approx(0.375)
    assert out["sim_bg"].item() == pytest.approx(0.625)
    assert out["cbs_active"].item() == pytest.approx(0.5)  # 2 of 4 pairs above 0.26
    assert out["pairs"].item() == 2
    assert evaluator.calls == [True]


def test_gamma_zero_removes_cbs():
    evaluator, objective = _objective(gamma=0.0)
    out = objective(*_inputs())
    otm = btm = (math.log(2) + math.log(4)) / 2
    assert out["total"].item() == pytest.approx(10 * otm + 24 * btm + 0.2 * 0.25, rel=1e-6)
    assert out["cbs"].item() == 0.0 and out["cbs_active"].item() == 0.0
    assert evaluator.calls == [False]  # no background scores computed at all


def test_switches_leave_terms_out_of_the_total():
    _, objective = _objective(enable_otm=False, enable_btm=False, enable_cbs=False)
    out = objective(*_inputs())
    assert out["total"].item() == pytest.approx(0.2 * 0.25)
    assert out["otm"].item() > 0  # still reported


def test_cbs_needs_background_prompts():
    bank = PromptBank(name="nobg", classes=("cat", "dog"), background=(), source="nobg.yaml")
    _, objective = _objective()
    with pytest.raises(ValueError, match=r"nobg.yaml: 'background' is empty but L_CBS is on.*loss.gamma=0"):
        objective.set_prompt_bank(bank)
    evaluator, objective = _objective(gamma=0.0)
    objective.set_prompt_bank(bank)
    assert evaluator.prompts == ([["a photo of cat."], ["a photo of dog."]], [])
