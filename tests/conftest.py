"""Suite-wide settings (single-threaded torch on 2 shared cores, no network, wandb offline) and fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from clims_pl.config import CONF_DIR

torch.set_num_threads(1)


def compose_config(config_name: str, root: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a real config from ``conf/`` with every path under ``root`` (no Hydra run dir needed)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            config_name,
            overrides=[f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}", *overrides],
        )
    with open_dict(cfg):
        cfg.print_config = False
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_cfg("train", ["experiment=toy_cam"])`` → config rooted in this test's tmp_path."""
    return lambda name, overrides=(): compose_config(name, tmp_path, overrides)


#: A small toy world shared by the whole session (generated once); pass ``toy_overrides(root)`` to compose.
TOY_PARAMS = {"seed": 0, "size": 64, "n_train_aug": 48, "n_train": 16, "n_val": 16}


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clims_pl.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy") / "toy"
    generate_toy(root, **TOY_PARAMS)
    return root


def toy_overrides(root: Path) -> list[str]:
    """Point data=toy at the session's small world, with sizes for 64-px images and no worker processes."""
    return [
        f"data.root={root}",
        *(f"data.toy.{k}={v}" for k, v in TOY_PARAMS.items()),
        "data.crop_size=64",
        "data.resize_long=[48,80]",
        "data.batch_size=8",
        "data.num_workers=0",
    ]
