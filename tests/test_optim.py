"""The reference PolyOptimizer semantics (docs/reference.md#polyoptimizer): poly lr per step, momentum quirk docs/reference.md#q1-polyoptimizer-momentum, coupled L2."""

from __future__ import annotations

import pytest
import torch

from clims_pl.optim import poly_factor, poly_sgd


def _setup(bug: bool):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    c = torch.nn.Parameter(torch.tensor([0.5]))
    cfg = poly_sgd(
        [{"params": [w], "lr": 0.1}, {"params": [c], "lr": 1.0}],
        weight_decay=1e-4,
        momentum=0.9,
        reference_momentum_bug=bug,
        poly_power=0.9,
        max_steps=10,
    )
    return w, c, cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def test_poly_factor_values() -> None:
    assert poly_factor(0, 10, 0.9) == 1.0
    assert poly_factor(3, 10, 0.9) == pytest.approx(0.7**0.9)
    # At t >= T the reference leaves the lr where it was.
    assert poly_factor(12, 10, 0.9) == poly_factor(9, 10, 0.9) == pytest.approx(0.1**0.9)


def test_momentum_quirk_and_group_lrs() -> None:
    _, _, opt, _ = _setup(bug=True)
    assert [g["momentum"] for g in opt.param_groups] == [1e-4, 1e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    _, _, opt, _ = _setup(bug=False)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]


def test_updates_match_hand_computation() -> None:
    w, _, opt, sched = _setup(bug=True)
    lrs = []
    for _ in range(2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        (w.sum() * 3).backward()  # gradient 3 everywhere
        opt.step()
        sched.step()
    # step 0: lr 0.1, d = 3 + 1e-4*w ; buffer b1 = d ; w1 = w0 - 0.1*b1
    w0 = torch.tensor([1.0, -2.0])
    d0 = 3 + 1e-4 * w0
    w1 = w0 - 0.1 * d0
    # step 1: lr 0.1*0.9**0.9 ; b2 = 1e-4*b1 + d1
    d1 = 3 + 1e-4 * w1
    w2 = w1 - 0.1 * 0.9**0.9 * (1e-4 * d0 + d1)
    assert lrs == pytest.approx([0.1, 0.1 * 0.9**0.9])
    torch.testing.assert_close(w.detach(), w2)


def test_empty_train_loader_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_steps > 0"):
        poly_sgd([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.1}], weight_decay=0, max_steps=0)
