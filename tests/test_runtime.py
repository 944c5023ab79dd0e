"""runtime.apply_runtime: the TF32 switch (quirk Q11) sets matmul and cuDNN flags together and is recorded."""

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
