"""Silent wrong settings fail when the real config is built, with one message naming the key and the allowed range."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import toy_overrides
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from clims_pl.config import check_number
from clims_pl.prompts.bank import PromptBankError
from clims_pl.stages.train import run


def _loss_error(compose_cfg, override: str) -> str:
    """Message of building the real `loss` group of experiment=toy_clims with one override (CLIP not built)."""
    cfg = compose_cfg("train", ["experiment=toy_clims", override])
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.loss, evaluator=None)
    assert isinstance(err.value.__cause__, ValueError)
    return str(err.value)


@pytest.mark.parametrize("key", ["alpha", "beta", "gamma", "delta"])
def test_negative_loss_weight_names_its_key(compose_cfg, key: str) -> None:
    assert f"loss.{key}=-0.5 is invalid: it must be a number >= 0" in _loss_error(compose_cfg, f"loss.{key}=-0.5")


@pytest.mark.parametrize("value", ["1.0", "-1", "2.5", "nan"])
def test_cbs_threshold_outside_minus_one_one(compose_cfg, value: str) -> None:
    message = _loss_error(compose_cfg, f"loss.cbs_threshold={value}")
    assert "loss.cbs_threshold=" in message and "must be a number > -1 and < 1" in message


def test_valid_loss_builds_with_reference_weights(compose_cfg) -> None:
    objective = instantiate(compose_cfg("train", ["experiment=paper_voc_clims"]).loss, evaluator=None)
    assert objective.weights == {"otm": 10.0, "btm": 24.0, "cbs": 1.0, "reg": 0.2}
    assert objective.cbs_threshold == 0.26
    # The toy's named adaptations (docs/toy_world.md, "Toy adaptations"): REG weight and CBS threshold.
    toy = instantiate(compose_cfg("train", ["experiment=toy_clims"]).loss, evaluator=None)
    assert toy.weights == {"otm": 10.0, "btm": 24.0, "cbs": 1.0, "reg": 2.0} and toy.cbs_threshold == 0.15


def test_non_numeric_loss_weight_is_reported_against_loss_alpha(toy_root: Path, compose_cfg) -> None:
    """Through clims-train's run(): named against loss.alpha, not a bare "could not convert string to float"."""
    cfg = compose_cfg("train", ["experiment=toy_clims", *toy_overrides(toy_root), "loss.alpha=abc"])
    with pytest.raises(InstantiationException, match=r"loss\.alpha='abc' is invalid: it must be a number >= 0"):
        run(cfg)


@pytest.mark.parametrize(
    ("experiment", "override", "expected"),
    [
        ("toy_cam", "data.batch_size=0", "data.batch_size=0 is invalid: it must be an integer >= 1"),
        ("toy_cam", "data.batch_size=2.5", "data.batch_size=2.5 is invalid: it must be an integer >= 1"),
        ("toy_cam", "data.num_workers=-1", "data.num_workers=-1 is invalid: it must be an integer >= 0"),
        ("toy_cam", "data.crop_size=0", "data.crop_size=0 is invalid: it must be an integer >= 1"),
        ("toy_cam", "+data.predict_batch_size=0", "data.predict_batch_size=0 is invalid"),
        ("toy_cam", "data.scales=[1.0,0]", "data.scales=0 is invalid: it must be a number > 0"),
        ("toy_cam", "data.resize_long=[160,80]", "data.resize_long=[160, 80] is invalid: it must be [lo, hi]"),
        ("toy_cam", "data.expected_train_aug=0", "data.expected_train_aug=0 is invalid"),
        ("toy_seg", "data.batch_size=0", "data.batch_size=0 is invalid: it must be an integer >= 1"),
        ("toy_seg", "data.num_workers=-2", "data.num_workers=-2 is invalid: it must be an integer >= 0"),
        ("toy_seg", "data.scales=[]", "data.scales is empty: give the training scales"),
        ("toy_irn", "data.batch_size=0", "data.batch_size=0 is invalid: it must be an integer >= 1"),
        ("toy_irn", "data.rescale=[1.5,0.5]", "data.rescale=[1.5, 0.5] is invalid: it must be [lo, hi]"),
    ],
)
def test_non_positive_data_sizes_name_their_key(compose_cfg, experiment: str, override: str, expected: str) -> None:
    label_dir = [] if experiment == "toy_cam" else ["data.label_dir=unused"]
    cfg = compose_cfg("train", [f"experiment={experiment}", *label_dir, override])
    with pytest.raises(InstantiationException, match="ValueError") as err:
        instantiate(cfg.data)
    assert expected in str(err.value)


def test_misspelt_class_fails_when_the_data_config_is_built(compose_cfg) -> None:
    cfg = compose_cfg("train", ["experiment=toy_cam", "data.classes=[aeroplane,boat,cow,trian]"])
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.data)
    assert isinstance(err.value.__cause__, PromptBankError)
    assert "data.classes must equal the 'classes' of the prompt bank" in str(err.value)
    assert "missing ['trian']" in str(err.value) and "unknown ['train']" in str(err.value)
    voc = compose_cfg("train", ["data.classes=[aeroplane,bicycle]"])  # a subset of VOC: not VOC's bank either
    with pytest.raises(InstantiationException, match=r"unknown \['bird', 'boat'"):
        instantiate(voc.data)


def test_check_number_bounds_and_types() -> None:
    assert check_number("k", "3", integer=True, ge=1) == 3 and isinstance(check_number("k", 3.0, integer=True), int)
    assert check_number("k", 0, ge=0) == 0.0
    for bad in (True, None, "abc", float("inf"), [1]):
        with pytest.raises(ValueError, match=r"^k=.* is invalid: it must be a number$"):
            check_number("k", bad)
    with pytest.raises(ValueError, match=r"^k=0 is invalid: it must be a number > 0 \(why\)$"):
        check_number("k", 0, gt=0, hint="why")
