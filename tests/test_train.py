"""`clims-train` on the toy world: learning, artifacts, DDP on CPU, kill + resume, wandb offline, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import toy_overrides
from hydra.utils import instantiate

from clims_pl.train import run

TOY_CAM = ["experiment=toy_cam", "trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1"]


class KillAt(L.Callback):
    """Simulates a crash (e.g. a pre-empted job) when the run reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def test_toy_cam_training_lowers_the_loss(toy_root: Path, compose_cfg) -> None:
    cfg = compose_cfg("train", [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=24", "trainer.max_epochs=-1"])
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.multilabel_soft_margin_loss(model(batch["image"]), batch["label"]).item()

    before = loss()
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 24
    assert loss() < before - 0.05


def test_run_writes_checkpoint_config_and_csv_metrics(toy_root: Path, compose_cfg) -> None:
    cfg = compose_cfg("train", [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=4", "trainer.max_epochs=-1"])
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert metrics["global_step"] == 4
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "experiment" not in (out / "config.yaml").read_text()  # resolved config, groups expanded
    assert "backbone: resnet18_toy" in (out / "config.yaml").read_text()
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "lr-SGD" in header
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and any(k.startswith("net.classifier") for k in ckpt["state_dict"])


def test_killed_run_resumes_to_the_same_step(toy_root: Path, compose_cfg) -> None:
    common = [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=8", "trainer.max_epochs=-1"]
    full = run(compose_cfg("train", common))
    killer = ["+callbacks.kill._target_=test_train.KillAt", "+callbacks.kill.step=5"]
    every3 = ["callbacks.model_checkpoint.every_n_train_steps=3"]
    cfg = compose_cfg("train", [*common, *every3, *killer, "paths.output_dir=${paths.root_dir}/killed"])
    with pytest.raises(RuntimeError, match="killed at step 5"):
        run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = run(
        compose_cfg("train", [*common, *every3, "paths.output_dir=${paths.root_dir}/killed", "ckpt_path=last"])
    )
    assert resumed["global_step"] == full["global_step"] == 8
    # The poly schedule continued from step 3 instead of restarting: same final lr as the uninterrupted run.
    assert resumed["lr_final"] == pytest.approx(full["lr_final"]) != pytest.approx(0.1)


@pytest.mark.slow
def test_ddp_cpu_two_processes(toy_root: Path, compose_cfg) -> None:
    cfg = compose_cfg(
        "train", [*TOY_CAM, *toy_overrides(toy_root), "trainer=ddp_cpu", "trainer.max_steps=2", "trainer.max_epochs=-1"]
    )
    run(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2


def test_wandb_offline_run(toy_root: Path, compose_cfg) -> None:
    cfg = compose_cfg(
        "train",
        [*TOY_CAM, *toy_overrides(toy_root), "logger=wandb", "logger.wandb.offline=true", "trainer.max_steps=2"],
    )
    run(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_cli_runs_with_progress_bar_and_bad_root_is_one_clear_line(toy_root: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("clims-train")
    env = {**os.environ, "CLIMS_ROOT": str(tmp_path)}
    ok = subprocess.run(
        [
            str(exe),
            "experiment=toy_cam",
            *toy_overrides(toy_root),
            "trainer.max_steps=2",
            "hydra.run.dir=" + str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Epoch 0" in ok.stderr + ok.stdout  # TQDM progress bar
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()
    bad = subprocess.run(
        [
            str(exe),
            "data.root=" + str(tmp_path / "nowhere"),
            "hydra.run.dir=" + str(tmp_path / "b"),
            "print_config=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "clims-data download voc" in bad.stderr
