"""runtime.apply_runtime: the TF32 switch (quirk docs/reference.md#q11-tf32) sets matmul and cuDNN flags together and is recorded."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from clims_pl.runtime import apply_runtime, prepare_run


def test_tf32_switch_sets_both_flags_and_is_recorded(tmp_path: Path, compose_cfg) -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        cfg = compose_cfg("train", ["experiment=toy_cam", "runtime.tf32=true"])
        out = prepare_run(cfg)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert OmegaConf.load(out / "config.yaml").runtime.tf32 is True
        apply_runtime(compose_cfg("refine", []))  # the default: full fp32 for both (PyTorch's own: cuDNN TF32)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_one_override_switches_tf32_in_every_pipeline_stage(tmp_path: Path) -> None:
    from conftest import compose_config

    from clims_pl.pipeline import compose_stage, stages_from_config

    cfg = compose_config("reproduce", tmp_path, ["experiment=toy_demo", 'pipeline.common=["runtime.tf32=true"]'])
    common = list(cfg.pipeline.common)
    for stage in stages_from_config(cfg.pipeline):
        composed = compose_stage(stage, stage.folder(tmp_path), tmp_path, common)
        assert composed.runtime.tf32 is True, stage.name
