"""ClimsModule: a few Lightning steps move the CAM net and never CLIP; init and checkpoint rules; configs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from clims_pl.losses import ClimsObjective
from clims_pl.models.cam_net import CAMNet
from clims_pl.models.checkpoint import read_state
from clims_pl.models.clip_evaluator import ClipEvaluator
from clims_pl.modules.clims import ClimsModule
from clims_pl.prompts.bank import PromptBank

BANK = PromptBank(name="t", classes=("cat", "dog", "bird", "boat"), background=("tree", "sea"))
OPTIM = {
    "lr": 0.01,
    "classifier_lr_mult": 10.0,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "reference_momentum_bug": True,
    "momentum": 0.9,
}


class _Data(L.LightningDataModule):
    """Four random 64-pixel images per batch with 1–2 classes each, plus the prompt bank ClimsModule needs."""

    prompt_bank = BANK

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        labels = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 1]] * 2, dtype=torch.float32)
        items = [
            {"image": torch.randn(3, 64, 64, generator=g), "label": label, "id": str(i)}
            for i, label in enumerate(labels)
        ]
        return DataLoader(items, batch_size=4)


def _net(bn_mode: str = "train", num_classes: int = 4) -> CAMNet:
    return CAMNet("resnet18", num_classes=num_classes, pretrained=False, bn_mode=bn_mode)


def _objective() -> ClimsObjective:
    torch.manual_seed(0)
    evaluator = ClipEvaluator("clims-tiny-vit", pretrained=None, precision="fp32")
    return ClimsObjective(evaluator, cbs_threshold=0.0)


@pytest.fixture
def cam_ckpt(tmp_path):
    """A baseline-CAM Lightning-style checkpoint (FixedBN net stored under ``net.``)."""
    torch.manual_seed(5)
    state = {f"net.{k}": v for k, v in _net("fixed").state_dict().items()}
    path = tmp_path / "cam.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_few_steps_train_the_net_not_clip(tmp_path, cam_ckpt):
    module = ClimsModule(_net(), _objective(), OPTIM, init_ckpt=str(cam_ckpt))
    init = read_state(cam_ckpt)[1]
    for key, value in module.net.state_dict().items():
        assert torch.equal(value, init[key]), key  # strict init from the baseline
    clip = module.objective.evaluator.clip
    clip_before = {k: v.clone() for k, v in clip.state_dict().items()}
    encode_text = clip.encode_text
    calls = []
    clip.encode_text = lambda *a, **k: calls.append(1) or encode_text(*a, **k)

    trainer = _trainer(tmp_path, steps=3)
    trainer.fit(module, datamodule=_Data())

    assert trainer.global_step == 3
    after = module.net.state_dict()
    assert not torch.equal(after["classifier.weight"], init["classifier.weight"])
    assert not torch.equal(after["backbone.layer4.1.conv2.weight"], init["backbone.layer4.1.conv2.weight"])
    assert torch.equal(after["backbone.conv1.weight"], init["backbone.conv1.weight"])  # frozen stem
    # docs/reference.md#q6-trainable-batchnorm: BN in train mode updates its running statistics.
    assert not torch.equal(after["backbone.layer1.0.bn1.running_mean"], init["backbone.layer1.0.bn1.running_mean"])
    for key, value in clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key
    assert all(p.grad is None for p in clip.parameters())
    assert len(calls) == 2  # class and background prompts, once for the whole run
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in clip.parameters()}
    assert [g["lr"] for g in trainer.optimizers[0].param_groups][1] < 0.1  # poly decay on the ×10 group
    metrics = trainer.callback_metrics
    for key in ("loss", "otm", "btm", "cbs", "reg", "sim_fg", "sim_bg", "cbs_active", "pairs"):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    assert metrics["train/pairs"].item() == 6
    assert metrics["train/cbs"].item() > 0  # threshold 0: every (crop, background) pair counts

    ckpt_path = tmp_path / "clims.ckpt"
    trainer.save_checkpoint(ckpt_path)
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in saved if k.startswith("objective.")]  # CLIP is rebuilt from config, not stored
    assert set(saved) == {f"net.{k}" for k in after}
    restored = ClimsModule.load_from_checkpoint(ckpt_path, net=_net(), objective=_objective())
    for key, value in restored.net.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_init_checkpoint_rules(tmp_path, cam_ckpt):
    with pytest.raises(ValueError, match=r"model.init_ckpt is required.*toy_cam"):
        ClimsModule(_net(), _objective(), OPTIM, init_ckpt=None)
    with pytest.raises(ValueError, match=r"model.init_ckpt=.*cam.ckpt: does not fit model.net"):
        ClimsModule(_net(num_classes=5), _objective(), OPTIM, init_ckpt=str(cam_ckpt))
    with pytest.raises(FileNotFoundError, match=r"nope.ckpt"):
        ClimsModule(_net(), _objective(), OPTIM, init_ckpt=str(tmp_path / "nope.ckpt"))
    ClimsModule(_net(), _objective(), OPTIM, init_ckpt=None, allow_random_init=True)


def test_model_config_builds(compose_cfg):
    cfg = compose_cfg(
        "train",
        ["model=clims", "clip=tiny", "model.net.backbone=resnet18", "model.allow_random_init=true", "loss.gamma=0"],
    )
    module = instantiate(cfg.model)
    assert isinstance(module, ClimsModule)
    evaluator = module.objective.evaluator
    assert isinstance(evaluator, ClipEvaluator) and evaluator.model_name == "clims-tiny-vit"
    assert evaluator.fused and evaluator.precision == "fp32" and evaluator.normalize == "reference"
    assert module.objective.weights == {"otm": 10.0, "btm": 24.0, "cbs": 0.0, "reg": 0.2}
    assert module.net.bn_mode == "train" and module.net.num_classes == 20
    assert module.hparams.optim["lr"] == 2.5e-4


def test_paper_experiment_has_reference_numbers(compose_cfg):
    cfg = compose_cfg("train", ["experiment=paper_voc_clims"])
    assert cfg.model._target_ == "clims_pl.modules.clims.ClimsModule"
    assert cfg.trainer.max_epochs == 15 and cfg.data.batch_size == 16 and cfg.data.crop_size == 512
    assert cfg.model.optim.lr == 2.5e-4 and cfg.model.optim.classifier_lr_mult == 10
    assert cfg.model.optim.weight_decay == 1e-4 and cfg.model.optim.reference_momentum_bug
    assert cfg.model.net.bn_mode == "train" and cfg.model.net.backbone == "resnet50"
    clip = cfg.model.objective.evaluator
    assert (clip.model, clip.pretrained, clip.precision, clip.normalize) == (
        "ViT-B-32-quickgelu",
        "openai",
        "fp16",
        "reference",
    )
    loss = cfg.model.objective
    assert (loss.alpha, loss.beta, loss.gamma, loss.delta, loss.cbs_threshold) == (10, 24, 1, 0.2, 0.26)
    assert cfg.data.prompts == "voc"


def test_toy_experiment_composes(compose_cfg):
    cfg = compose_cfg("train", ["experiment=toy_clims", "model.init_ckpt=/some/cam.ckpt"])
    clip = cfg.model.objective.evaluator
    assert (clip.model, clip.pretrained, clip.precision) == ("clims-tiny-vit", None, "fp32")
    assert cfg.model.net.backbone == "resnet18_toy" and cfg.model.net.bn_mode == "train"
    assert cfg.data.prompts == "toy" and cfg.model.init_ckpt == "/some/cam.ckpt"
