"""experiment=paper_voc pins every reference hyper-parameter (docs/reference.md#hyper-parameters and the stage sections): each stage's
config is composed exactly as clims-reproduce composes it (no training) and checked against docs/reference.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import compose_config
from omegaconf import DictConfig, OmegaConf

from clims_pl.pipeline import compose_stage, stages_from_config

VOC = "/data/VOCdevkit/VOC2012"
# docs/reference.md#q1-polyoptimizer-momentum, docs/reference.md#polyoptimizer PolyOptimizer
POLY_SGD = {"model.optim.reference_momentum_bug": True, "model.optim.poly_power": 0.9}

#: stage → {dotted key: reference value}; "{run}" is the pipeline's run_dir.
EXPECTED: dict[str, dict[str, Any]] = {
    # docs/reference.md#stage-a-baseline-cam, docs/reference.md#hyper-parameters: baseline CAM.
    "cam": {
        **POLY_SGD,
        "model._target_": "clims_pl.modules.cam.CAMModule",
        "trainer.max_epochs": 5,
        "model.optim.lr": 0.1,
        "model.optim.classifier_lr_mult": 10.0,
        "model.optim.weight_decay": 1e-4,
        "data.batch_size": 16,
        "data.crop_size": 512,
        "data.resize_long": [320, 640],
        "data.train_split": "train_aug",
        "model.net.backbone": "resnet50",
        "model.net.pretrained": True,
        "model.net.pretrained_tag": "tv_in1k",
        "model.net.bn_mode": "fixed",
        "model.net.freeze_stem": True,
        "trainer.precision": "32-true",
        "ckpt_path": "last",
    },
    # docs/reference.md#stage-b-clims-training, docs/reference.md#hyper-parameters: CLIMS.
    "clims": {
        **POLY_SGD,
        "model._target_": "clims_pl.modules.clims.ClimsModule",
        "model.init_ckpt": "{run}/cam/checkpoints/last.ckpt",
        "trainer.max_epochs": 15,
        "model.optim.lr": 2.5e-4,
        "model.optim.classifier_lr_mult": 10.0,
        "model.optim.weight_decay": 1e-4,
        "data.batch_size": 16,
        "data.crop_size": 512,
        "data.resize_long": [320, 640],
        "data.train_split": "train_aug",
        "data.prompts": "voc",
        "loss.alpha": 10.0,
        "loss.beta": 24.0,
        "loss.gamma": 1.0,
        "loss.delta": 0.2,
        "loss.cbs_threshold": 0.26,
        "loss.enable_otm": True,
        "loss.enable_btm": True,
        "loss.enable_cbs": True,
        "loss.enable_reg": True,
        "clip.model": "ViT-B-32-quickgelu",
        "clip.pretrained": "openai",
        "clip.precision": "fp16",
        "clip.normalize": "reference",
        "clip.input_size": None,  # the architecture's 224
        "model.net.backbone": "resnet50",
        "model.net.bn_mode": "train",
        "model.net.freeze_stem": True,
        # docs/reference.md#q6-trainable-batchnorm: BN batch statistics over the reference's 16 images
        "trainer.devices": 1,
        "trainer.precision": "32-true",
        "trainer.limit_val_batches": 0,
    },
    # docs/reference.md#stage-c-cam-inference: 4-scale + flip CAMs of train_aug from the CLIMS weights.
    "cams": {
        "ckpt": "{run}/clims/checkpoints/last.ckpt",
        "data.scales": [1.0, 0.5, 1.5, 2.0],
        "infer.split": "train_aug",
        "model.net.backbone": "resnet50",
        "model.net.bn_mode": "train",
    },
    # docs/reference.md#stage-d-cam-evaluation: VOC train (1,464), background 0.15.
    "eval_cams": {"eval.threshold": 0.15, "eval.split": "train", "eval.cam_dir": "{run}/cams/cams"},
    # docs/reference.md#stage-e-ir-labels, docs/reference.md#q9-background-thresholds: IR labels.
    "ir_labels": {
        "ir_labels.split": "train_aug",
        "ir_labels.cam_dir": "{run}/cams/cams",
        "ir_labels.fg_threshold": 0.30,
        "ir_labels.bg_threshold": 0.10,
        "ir_labels.crf.gt_prob": 0.7,
        "ir_labels.crf.iterations": 10,
        "ir_labels.crf.gaussian_sxy": 3,
        "ir_labels.crf.gaussian_compat": 3,
        "ir_labels.crf.bilateral_sxy": 50,
        "ir_labels.crf.bilateral_srgb": 5,
        "ir_labels.crf.bilateral_compat": 10,
    },
    # docs/reference.md#stage-f-irn-training, docs/reference.md#hyper-parameters: IRN.
    "irn": {
        **POLY_SGD,
        "model._target_": "clims_pl.modules.irn.IRNModule",
        "data.label_dir": "{run}/ir_labels/ir_labels",
        "data.train_split": "train_aug",
        "data.crop_size": 512,
        "data.batch_size": 32,
        "data.rescale": [0.5, 1.5],
        "trainer.max_epochs": 3,
        "model.optim.lr": 0.1,
        "model.optim.weight_decay": 1e-4,
        "model.radius": 10,
        "model.crop_size": 512,
        "model.net.backbone": "resnet50",
        "model.net.pretrained": True,
        "model.net.pretrained_tag": "tv_in1k",
    },
    # docs/reference.md#stage-g-random-walk, docs/reference.md#stage-h-pseudo-label-evaluation, docs/reference.md#q9-background-thresholds, docs/reference.md#q10-random-walk-radius: random walk + its evaluation on VOC train.
    "pseudo": {
        "ckpt": "{run}/irn/checkpoints/last.ckpt",
        "pseudo.cam_dir": "{run}/cams/cams",
        "pseudo.split": "train_aug",
        "pseudo.eval_split": "train",
        "pseudo.radius": 5,
        "pseudo.beta": 10,
        "pseudo.exp_times": 8,
        "pseudo.bg_threshold": 0.2,
        "model.net.backbone": "resnet50",
        # docs/reference.md#stage-g-random-walk: the reference snapshot runs the edge net unpadded
        "model.net.inference_pad": None,
    },
    # docs/reference.md#deeplab-config, docs/reference.md#deeplab-architecture, docs/reference.md#deeplab-training: DeepLab-v2 R101 MSC, ImageNet init (main_v2).
    "seg": {
        "model._target_": "clims_pl.modules.seg.SegModule",
        "data.label_dir": "{run}/pseudo/pseudo",
        "data.train_split": "train_aug",
        "data.crop_size": 321,
        "data.batch_size": 10,
        "trainer.accumulate_grad_batches": 2,
        "trainer.max_steps": 30000,
        "data.scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
        "data.flip": True,
        "data.copy_paste": 0.0,  # the toy's copy-paste is not the reference's
        "model.loss": "balanced",
        "model.ignore_index": 255,
        "model.optim.lr": 2.5e-4,
        "model.optim.momentum": 0.9,
        "model.optim.weight_decay": 5e-4,
        "model.optim.poly_power": 0.9,
        "model.optim.lr_step": 10,
        "model.optim.aspp_weight_lr_mult": 10.0,
        "model.optim.aspp_bias_lr_mult": 20.0,
        "model.net.backbone": "resnet101",
        "model.net.atrous_rates": [6, 12, 18, 24],
        "model.net.msc_scales": [0.5, 0.75],
        # deeplab_init=null: the torchvision trunk (test_deeplab_init_selects_the_caffe_trunk for the reference's).
        "model.net.trunk": "torchvision",
        "model.net.pretrained": True,
        "data.normalization": "imagenet",
        "trainer.precision": "32-true",
    },
    # docs/reference.md#deeplab-test-and-crf: val (SegmentationClassAug) without and with CRF 10 iterations, Gaussian 1/3, bilateral 67/3/4, docs/reference.md#q22-deeplab-crf-image kept.
    "seg_eval": {
        "ckpt": "{run}/seg/checkpoints/last.ckpt",
        "model.net.backbone": "resnet101",
        "model.net.atrous_rates": [6, 12, 18, 24],
        "model.net.msc_scales": [0.5, 0.75],
        "seg_eval.val_split": "val",
        "seg_eval.val_gt": "aug",
        "model.net.trunk": "torchvision",  # deeplab_init=null; its normalisation follows the trunk
        "seg_eval.crf.enabled": True,
        "seg_eval.crf.reference_bug": True,
        "seg_eval.crf.params.iterations": 10,
        "seg_eval.crf.params.gaussian_sxy": 1,
        "seg_eval.crf.params.gaussian_compat": 3,
        "seg_eval.crf.params.bilateral_sxy": 67,
        "seg_eval.crf.params.bilateral_srgb": 3,
        "seg_eval.crf.params.bilateral_compat": 4,
    },
    "report": {"report.run_dir": "{run}"},
}


@pytest.fixture(scope="module")
def paper_stages(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, dict[str, DictConfig]]:
    root = tmp_path_factory.mktemp("paper")
    cfg = compose_config("reproduce", root, ["experiment=paper_voc", f"data.root={VOC}"])
    run_dir = Path(cfg.run_dir)
    stages = stages_from_config(cfg.pipeline)
    return cfg, {s.name: compose_stage(s, s.folder(run_dir), root, []) for s in stages}


def test_stage_order_and_dependencies(paper_stages: tuple[DictConfig, dict[str, DictConfig]]) -> None:
    cfg, stages = paper_stages
    assert list(stages) == list(EXPECTED)
    assert cfg.run_dir.endswith("/runs/paper_voc")
    after = {name: list(node.get("after") or []) for name, node in cfg.pipeline.stages.items()}
    assert after["pseudo"] == ["irn", "cams"] and after["report"] == ["eval_cams", "pseudo", "seg_eval"]


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_reference_numbers(stage: str, paper_stages: tuple[DictConfig, dict[str, DictConfig]]) -> None:
    cfg, stages = paper_stages
    composed = stages[stage]
    wrong = {}
    for key, want in EXPECTED[stage].items():
        want = want.replace("{run}", cfg.run_dir) if isinstance(want, str) else want
        got = OmegaConf.select(composed, key, default="<missing>")
        got = OmegaConf.to_container(got, resolve=True) if OmegaConf.is_config(got) else got
        if got != want or (type(got) is not type(want) and not isinstance(want, float)):
            wrong[key] = (got, want)
    assert not wrong, f"{stage}: (composed, reference) {wrong}"
    if "data" in composed:
        assert composed.data.root == VOC  # the pipeline's data.root feeds every stage


def test_report_rows_point_at_reference_metrics(paper_stages: tuple[DictConfig, dict[str, DictConfig]]) -> None:
    import yaml

    from clims_pl.stages.report import REFERENCE_FILE

    _, stages = paper_stages
    reference = yaml.safe_load(REFERENCE_FILE.read_text())["metrics"]
    rows = OmegaConf.to_container(stages["report"].report.rows)
    assert [(r["stage"], r["key"], r.get("ref")) for r in rows] == [
        ("eval_cams", "miou", "cam_train"),
        ("eval_cams", "best_miou", None),
        ("pseudo", "miou", "pseudo_train"),
        ("seg_eval", "crf.miou", "seg_val"),
        ("seg_eval", "plain.miou", None),
    ]
    assert all(r["ref"] in reference for r in rows if "ref" in r)
    assert all(r["stage"] in stages for r in rows)


def test_deeplab_init_selects_the_caffe_trunk(tmp_path: Path) -> None:
    """docs/reference.md#deeplab-architecture: given the reference's init file, seg trains and seg_eval evaluates the Caffe trunk on BGR input."""
    init = "/weights/deeplabv1_resnet101-imagenet.pth"
    cfg = compose_config("reproduce", tmp_path, ["experiment=paper_voc", f"data.root={VOC}", f"deeplab_init={init}"])
    stages = {s.name: s for s in stages_from_config(cfg.pipeline)}
    run_dir = Path(cfg.run_dir)
    seg = compose_stage(stages["seg"], stages["seg"].folder(run_dir), tmp_path, [])
    seg_eval = compose_stage(stages["seg_eval"], stages["seg_eval"].folder(run_dir), tmp_path, [])
    assert (seg.model.net.trunk, seg.model.net.pretrained, seg.data.normalization) == ("caffe", init, "caffe_bgr")
    assert seg_eval.model.net.trunk == "caffe"
