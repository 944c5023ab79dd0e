"""Precision paths: bf16-mixed through every training stage on CPU, and the dtypes paper_voc's CLIP uses on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import toy_overrides
from torch import nn

from clims_pl.models.clip_evaluator import ClipEvaluator, clip_dtype, resolve_precision
from clims_pl.prompts.bank import load_prompt_bank
from clims_pl.stages.train import run

TIMER = ["+callbacks.preflight_timer._target_=clims_pl.preflight.StepTimer"]
BF16 = ["trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.max_epochs=-1", "logger=csv", *TIMER]


def test_bf16_mixed_runs_every_training_stage(toy_root: Path, compose_cfg, tmp_path: Path) -> None:
    """cam → clims (from cam's checkpoint) → irn, seg (ground-truth masks as their labels), 2 steps each."""
    labelled = [f"data.root={toy_root}", f"data.label_dir={toy_root / 'SegmentationClassAug'}", "data.num_workers=0"]
    stages = {
        "cam": ["experiment=toy_cam", *toy_overrides(toy_root)],
        "clims": [
            "experiment=toy_clims",
            *toy_overrides(toy_root),
            f"model.init_ckpt={tmp_path}/cam/checkpoints/last.ckpt",
        ],
        "irn": ["experiment=toy_irn", *labelled, "data.crop_size=96", "data.batch_size=4"],  # radius 10: 24-cell grid
        # One 2-batch epoch, then validation (MSC) under bf16 autocast too.
        "seg": [
            "experiment=toy_seg",
            *labelled,
            "data.crop_size=64",
            "data.batch_size=4",
            "+trainer.limit_train_batches=2",
            "trainer.check_val_every_n_epoch=1",
            "trainer.limit_val_batches=2",
        ],
    }
    for name, overrides in stages.items():
        out = tmp_path / name
        cfg = compose_cfg("train", [*overrides, *BF16, f"paths.output_dir={out}"])
        metrics = run(cfg)
        assert metrics["global_step"] == 2, name
        timer = json.loads((out / "preflight_steps.json").read_text())
        # The network computed in bf16 (autocast) on fp32 master weights; the losses come out finite.
        precision = (timer["trainer_precision"], timer["param_dtype"], timer["compute_dtype"])
        assert precision == ("bf16-mixed", "float32", "bfloat16"), name
        assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k), (name, metrics)
        assert any("loss" in k for k in metrics), name
        state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point()), name
    # The CLIP teacher keeps its own precision (clip.precision, fp32 for the toy) whatever the trainer's autocast.
    assert json.loads((tmp_path / "clims" / "preflight_steps.json").read_text())["clip_dtype"] == "float32"
    assert 0.0 <= metrics["val/miou"] <= 1.0  # seg's last metrics: its validation ran


def test_clip_precision_choice_per_device(compose_cfg) -> None:
    paper = compose_cfg("train", ["experiment=paper_voc_clims"]).clip.precision
    assert paper == "fp16"
    assert resolve_precision(paper, "cuda") == resolve_precision(paper, "cpu") == "fp16"  # pinned, not "auto"
    assert clip_dtype(paper, "cuda") == torch.float16
    assert (resolve_precision("auto", "cuda"), resolve_precision("auto", "cpu")) == ("fp16", "fp32")
    assert clip_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match=r"clip.precision must be one of auto, fp32, fp16, bf16; got 'half'"):
        resolve_precision("half", "cuda")


def test_paper_voc_clip_dtypes_on_cuda_path(compose_cfg) -> None:
    """The evaluator paper_voc builds on a GPU (fp16), on CPU kernels: GEMM weights and image inputs in fp16,
    LayerNorms in fp32 (open_clip's LayerNormFp32), scores within fp16 rounding of the fp32 evaluator's."""
    clip = compose_cfg("train", ["experiment=paper_voc_clims"]).clip
    bank = load_prompt_bank("voc")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 20, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, [0, 14]] = 1
    scores = {}
    for precision in (resolve_precision(clip.precision, "cuda"), "fp32"):
        torch.manual_seed(0)
        evaluator = ClipEvaluator("clims-tiny-vit", pretrained=None, precision=precision, normalize=clip.normalize)
        evaluator.set_prompts(bank.class_prompts(), bank.background_prompts())
        scores[precision] = evaluator(maps, images, labels)
        if precision == "fp16":
            assert evaluator.dtype == torch.float16
            gemm = [m.weight for m in evaluator.clip.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
            assert gemm and all(w.dtype == torch.float16 for w in gemm)
            norms = [m for m in evaluator.clip.modules() if isinstance(m, nn.LayerNorm)]
            assert norms and all(type(m).__name__ == "LayerNormFp32" and m.weight.dtype == torch.float32 for m in norms)
    fp16, fp32 = scores["fp16"], scores["fp32"]
    assert fp16.s_fg.dtype == fp16.s_fg_bg.dtype == torch.float16 and len(fp16.s_fg) == 3
    torch.testing.assert_close(fp16.s_fg.float(), fp32.s_fg, rtol=0, atol=5e-3)
    torch.testing.assert_close(fp16.s_fg_bg.float(), fp32.s_fg_bg, rtol=0, atol=5e-3)
