"""`clims-train` on the toy world: learning, artifacts, DDP on CPU, kill + resume, wandb offline, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import toy_overrides
from hydra.utils import instantiate

from clims_pl.runtime import remove_unused_run_dir
from clims_pl.stages.train import run

TOY_CAM = ["experiment=toy_cam", "trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1"]


class KillAt(L.Callback):
    """Simulates a crash (``exception``), Ctrl-C (``sigint``) or a pre-empted job (``sigterm``) at ``step``."""

    def __init__(self, step: int, how: str = "exception") -> None:
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        if self.how == "exception":
            raise RuntimeError(f"killed at step {self.step}")
        if self.how == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the run at the end of this batch


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


@pytest.mark.parametrize("kill", ["exception", "sigint", "sigterm"])
def test_interrupted_run_saves_last_and_resumes_to_the_same_step(toy_root: Path, compose_cfg, kill: str) -> None:
    common = [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=8", "trainer.max_epochs=-1"]
    full = run(compose_cfg("train", common))
    killer = ["+callbacks.kill._target_=test_train.KillAt", "+callbacks.kill.step=5", f"+callbacks.kill.how={kill}"]
    cfg = compose_cfg("train", [*common, *killer, "paths.output_dir=${paths.root_dir}/killed"])
    # Lightning turns Ctrl-C and SIGTERM (scancel, SLURM preemption) into an orderly exit after saving.
    with pytest.raises(RuntimeError if kill == "exception" else SystemExit):
        run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # The default callbacks save on the interruption itself (every_n_train_steps=20 is not reached); after SIGTERM
    # Lightning finishes the batch in progress first.
    assert torch.load(last, weights_only=True)["global_step"] == (6 if kill == "sigterm" else 5)
    resumed = run(compose_cfg("train", [*common, "paths.output_dir=${paths.root_dir}/killed", "ckpt_path=last"]))
    assert resumed["global_step"] == full["global_step"] == 8
    # The poly schedule continued from step 5 (6) instead of restarting: same final lr as the uninterrupted run.
    assert resumed["lr_final"] == pytest.approx(full["lr_final"]) != pytest.approx(0.1)


class PauseOnce(L.Callback):
    """Writes ``marker`` and sleeps when the run reaches ``step`` for the first time, so a test can ``kill -9`` it
    there; a rerun (the marker exists) does not pause."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            time.sleep(600)


def _csv_steps(path: Path) -> dict[int, str]:
    """step → train/loss of the rows that logged one (as written, to compare exactly)."""
    rows = list(csv.DictReader(path.open()))
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert len(steps) == len(set(steps)), f"a step logged twice: {sorted(steps)}"
    return {int(r["step"]): r["train/loss"] for r in rows if r["train/loss"]}


@pytest.mark.slow
def test_kill9_resumes_from_the_periodic_checkpoint_with_default_callbacks(toy_root: Path, tmp_path: Path) -> None:
    """toy_cam saves last.ckpt every 20 steps by default: killed with SIGKILL at step 22, the same command resumes
    from step 20 and ends at step 30, with csv/metrics.csv holding every step once (old rows kept)."""
    marker, out = tmp_path / "paused", tmp_path / "r"
    command = [
        str(Path(sys.executable).with_name("clims-train")),
        "experiment=toy_cam",
        *toy_overrides(toy_root),
        "trainer.max_steps=30",
        "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "ckpt_path=last",
        "print_config=false",
        "+callbacks.pause._target_=test_train.PauseOnce",
        "+callbacks.pause.step=22",
        f"+callbacks.pause.marker={marker}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(Path(__file__).parent)])}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), first.communicate(timeout=5)[1][-2000:] if first.poll() is not None else "timed out"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    before = _csv_steps(out / "csv" / "metrics.csv")
    assert sorted(before) == list(range(22))  # rows are flushed as logged; 20 and 21 came after the checkpoint
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout + second.stderr
    assert json.loads((out / "metrics" / "train.json").read_text())["global_step"] == 30
    after = _csv_steps(out / "csv" / "metrics.csv")
    assert sorted(after) == list(range(30))
    assert all(after[step] == before[step] for step in range(20))  # the killed run's rows are kept as written


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
    assert not (tmp_path / "b").exists()  # a failed launch leaves no (timestamped) run folder behind


def test_only_an_unused_run_folder_is_removed_after_a_failure(tmp_path: Path) -> None:
    for name in ("empty", "resumed"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("a: 1")
        (tmp_path / name / "train.log").write_text("error")
        (tmp_path / name / "config.yaml").write_text("a: 1")
    (tmp_path / "resumed" / "checkpoints").mkdir()
    assert remove_unused_run_dir(tmp_path / "empty") and not (tmp_path / "empty").exists()
    assert not remove_unused_run_dir(tmp_path / "resumed") and (tmp_path / "resumed" / "config.yaml").exists()


def test_training_is_bit_identical_for_the_same_seed(toy_root: Path, compose_cfg) -> None:
    """Issue 14 item 8: the README's numbers are reproducible only if a run is a function of its config."""
    common = [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=3", "trainer.max_epochs=-1"]
    outs = []
    for name in ("one", "two"):
        cfg = compose_cfg("train", [*common, f"paths.output_dir=${{paths.root_dir}}/{name}"])
        run(cfg)
        outs.append(Path(cfg.paths.output_dir))
    losses = [_csv_steps(out / "csv" / "metrics.csv") for out in outs]
    assert sorted(losses[0]) == [0, 1, 2] and losses[0] == losses[1]
    states = [torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for out in outs]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # ... and the seed matters: another one gives other weights.
    cfg = compose_cfg("train", [*common, "seed=1", "paths.output_dir=${paths.root_dir}/three"])
    run(cfg)
    other = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_ckpt_path_last_resumes_only_a_checkpoint_of_the_same_provenance(
    toy_root: Path, compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: a rerun with ckpt_path=last "resumed" whatever last.ckpt the folder held, even one trained with
    another config, and trained nothing."""
    common = [*TOY_CAM, *toy_overrides(toy_root), "trainer.max_steps=4", "trainer.max_epochs=-1", "ckpt_path=last"]
    run(compose_cfg("train", common))
    out = Path(compose_cfg("train", common).paths.output_dir)
    first = _csv_steps(out / "csv" / "metrics.csv")
    caplog.clear()
    with caplog.at_level("INFO", logger="clims_pl"):
        run(compose_cfg("train", [*common, "callbacks.model_checkpoint.every_n_train_steps=2"]))  # same provenance
    assert "resuming from" in caplog.text and _csv_steps(out / "csv" / "metrics.csv") == first
    caplog.clear()
    with caplog.at_level("INFO", logger="clims_pl"):
        run(compose_cfg("train", [*common, "model.optim.lr=0.05"]))  # another run: starts at step 0
    assert "resuming from" not in caplog.text and "clearing 2 earlier checkpoints and logs" in caplog.text
    other = _csv_steps(out / "csv" / "metrics.csv")
    assert sorted(other) == [0, 1, 2, 3] and other[0] == first[0] and other[3] != first[3]
