"""Dashboards: what `publish` logs for a finished stage, read back from TensorBoard event files, the CSV file and
wandb's offline run files."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from cam_fixtures import write_cam_files, write_voc_root
from PIL import Image

from clims_pl.dashboard import publish
from clims_pl.data.imageio import save_label_png
from clims_pl.pipeline import finish_wandb_run
from clims_pl.prompts.bank import PromptBankError

SHAPES = {"2007_000001": (30, 45), "2007_000002": (36, 24), "2007_000003": (20, 20)}
SWEEP = {"threshold": [0.1, 0.2, 0.3], "miou": [0.25, 0.5, None]}


def _stage(tmp_path: Path) -> tuple[Path, Path]:
    """A finished CAM stage folder: cams/ (3 ids), pseudo/ labels (2 ids), metrics/cams.json with a sweep."""
    root, stage_dir = tmp_path / "voc", tmp_path / "pipe" / "eval_clims"
    masks = write_voc_root(root, SHAPES)
    write_cam_files(stage_dir / "cams", masks)
    for image_id in list(SHAPES)[:2]:
        save_label_png(stage_dir / "pseudo" / f"{image_id}.png", np.minimum(masks[image_id], 20))
    result = {
        "kind": "cams",
        "class_names": ["background", "aeroplane"],
        "miou": 0.375,
        "best_miou": 0.5,
        "best_threshold": 0.2,
        "threshold": 0.15,
        "iou": {"aeroplane": 0.25, "background": 0.5},
        "sweep": SWEEP,
        "confusion": [[1, 2], [3, 4]],
    }
    Image.new("RGB", (64, 48), "blue").save(stage_dir / "cam_sweep.png")  # a figure of clims_pl.plots
    (stage_dir / "metrics").mkdir(parents=True)
    (stage_dir / "metrics" / "cams.json").write_text(json.dumps(result))
    return root, stage_dir


def test_publish_without_a_logger_logs_nothing(tmp_path: Path, compose_cfg) -> None:
    root, stage_dir = _stage(tmp_path)
    assert publish("eval_clims", stage_dir, compose_cfg("refine", [f"data.root={root}"])) == []
    assert not (stage_dir / "dashboard").exists()


def test_label_panels_of_a_stage_without_cams_do_not_read_the_prompt_bank(tmp_path: Path, compose_cfg) -> None:
    from clims_pl.dashboard import write_panels

    root, stage_dir = _stage(tmp_path)
    cfg = compose_cfg("refine", [f"data.root={root}", f"data.prompts={tmp_path / 'missing_bank.yaml'}"])
    with pytest.raises(PromptBankError, match=r"missing_bank\.yaml.*: no such prompt bank"):
        write_panels(stage_dir, cfg, 2)  # CAM panels name the classes through the (missing) bank
    for npz in (stage_dir / "cams").glob("*.npz"):
        npz.unlink()
    assert sorted(write_panels(stage_dir, cfg, 2)) == ["figures/cam_sweep", "pseudo/2007_000001", "pseudo/2007_000002"]


def test_tensorboard_and_csv_read_back(tmp_path: Path, compose_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, stage_dir = _stage(tmp_path)
    cfg = compose_cfg("eval", [f"data.root={root}", "logger=many", "+dashboard.images=2"])
    loggers = publish("eval_clims", stage_dir, cfg)
    assert sorted(type(lg).__name__ for lg in loggers) == ["ResumableCSVLogger", "TensorBoardLogger"]
    events = EventAccumulator(str(stage_dir / "dashboard" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalar = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalar["eval_clims/cams/miou"] == [(0, 0.375)]
    assert scalar["eval_clims/cams/best_threshold"] == [(0, pytest.approx(0.2))]
    assert scalar["eval_clims/cams/iou/aeroplane"] == [(0, 0.25)]
    # The sweep curve: one point per threshold with an mIoU (None = class-less threshold, left out).
    assert scalar["eval_clims/sweep/miou"] == [(0, 0.25), (1, 0.5)]
    assert [v for _, v in scalar["eval_clims/sweep/threshold"]] == pytest.approx([0.1, 0.2])
    # 2 panels (dashboard.images) per folder: CAM overlays and pseudo labels, each next to its ground truth; figures.
    assert sorted(events.Tags()["images"]) == [
        "eval_clims/images/cams/2007_000001",
        "eval_clims/images/cams/2007_000002",
        "eval_clims/images/figures/cam_sweep",
        "eval_clims/images/pseudo/2007_000001",
        "eval_clims/images/pseudo/2007_000002",
    ]
    image = events.Images("eval_clims/images/pseudo/2007_000001")[0]
    saved = Image.open(stage_dir / "dashboard" / "images" / "pseudo" / "2007_000001.png")
    assert (image.width, image.height) == saved.size and saved.size[0] > 3 * 45  # image | label | ground truth
    table = events.Tensors("eval_clims/class_iou/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| class | eval_clims |" in table and "| background | 0.5 |" in table
    with (stage_dir / "dashboard" / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], float(r["eval_clims/cams/miou"])) for r in rows if r["eval_clims/cams/miou"]] == [("0", 0.375)]
    assert [float(r["eval_clims/sweep/miou"]) for r in rows if r["eval_clims/sweep/miou"]] == [0.25, 0.5]
    hparams = yaml.safe_load((stage_dir / "dashboard" / "csv" / "hparams.yaml").read_text())
    assert hparams["stage"] == "eval_clims" and hparams["config"]["eval"]["threshold"] == 0.15


def test_wandb_offline_run_per_stage_read_back(tmp_path: Path, compose_cfg) -> None:
    root, stage_dir = _stage(tmp_path)
    overrides = ["logger=wandb", "logger.wandb.offline=true", "logger.wandb.group=g1"]
    overrides += ["logger.wandb.name=eval_clims", "logger.wandb.job_type=eval_clims", "+dashboard.images=1"]
    cfg = compose_cfg("eval", [f"data.root={root}", *overrides])
    try:
        (logger,) = publish("eval_clims", stage_dir, cfg)
        run_id = logger.experiment.id
    finally:
        finish_wandb_run()
    (run_dir,) = (stage_dir / "dashboard" / "wandb").glob(f"offline-run-*-{run_id}")
    records = _records(run_dir / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, run.display_name) == ("g1", "eval_clims", "eval_clims")
    summary = _updates(r.summary.update for r in records if r.WhichOneof("record_type") == "summary")
    assert summary["eval_clims/cams/miou"] == 0.375 and summary["eval_clims/cams/iou/background"] == 0.5
    config = _updates(r.config.update for r in records if r.WhichOneof("record_type") == "config")
    assert config["stage"] == "eval_clims" and config["config"]["eval"]["threshold"] == 0.15
    media = run_dir / "files" / "media"
    (sweep,) = media.glob("table/eval_clims/sweep_table_*.table.json")
    assert json.loads(sweep.read_text())["data"] == [[0.1, 0.25], [0.2, 0.5]]
    (table,) = media.glob("table/eval_clims/class_iou_*.table.json")
    assert json.loads(table.read_text())["data"] == [["background", 0.5], ["aeroplane", 0.25]]
    images = sorted(p.relative_to(media / "images").parent.as_posix() for p in media.glob("images/**/*.png"))
    assert images == ["eval_clims/images/cams", "eval_clims/images/figures", "eval_clims/images/pseudo"]


def _records(path: Path) -> list:
    """The records of an offline run's transaction log (``run-<id>.wandb``), parsed with wandb's own protobuf.

    The file is a LevelDB-style log (wandb 0.31 ships no Python reader): a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # offline, wandb-core may still be writing the log of a finished run: wait for it
    data, pos, chunk, out, block = path.read_bytes(), 7, b"", [], 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _updates(batches) -> dict:
    """Key → value of config / summary update items (later updates win)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for batch in batches for item in batch}


def fake_eval(cfg) -> dict:
    """A stage writing what clims-eval writes; with ``+opens_run=true`` it first opens its own wandb run, as a
    Lightning training stage's WandbLogger does."""
    from hydra.utils import instantiate

    if cfg.get("opens_run"):
        instantiate(cfg.logger.wandb).log_metrics({"train/loss": 1.5}, step=7)
    out = Path(cfg.paths.output_dir) / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cams.json").write_text(json.dumps({"miou": 0.1 * cfg.seed, "sweep": SWEEP, "iou": {"background": 0.5}}))
    return {}


def test_pipeline_publishes_each_stage_to_its_own_wandb_run_in_one_group(tmp_path: Path) -> None:
    from clims_pl.pipeline import Stage, logger_overrides, run_pipeline

    def stage(name: str, seed: int, *extra: str) -> Stage:
        overrides = (f"+seed={seed}", *logger_overrides("refine", "wandb", "grp", name), "logger.wandb.offline=true")
        return Stage(name, "refine", "test_dashboard:fake_eval", (), (*overrides, *extra), ("metrics",))

    run_pipeline([stage("train_a", 2, "+opens_run=true"), stage("eval_b", 3)], tmp_path / "pipe", tmp_path)
    runs = {}
    for name in ("train_a", "eval_b"):
        (log,) = (tmp_path / "pipe" / name).rglob("offline-run-*/run-*.wandb")  # one run per stage
        records = _records(log)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        summary = _updates(r.summary.update for r in records if r.WhichOneof("record_type") == "summary")
        runs[name] = (run.run_group, run.job_type, run.display_name, summary[f"{name}/cams/miou"])
    assert runs == {
        "train_a": ("grp", "train_a", "train_a", 0.2),
        "eval_b": ("grp", "eval_b", "eval_b", pytest.approx(0.3)),
    }
    # The training-like stage's own run was continued (no second run in its dashboard folder).
    assert not (tmp_path / "pipe" / "train_a" / "dashboard" / "wandb").exists()


def test_swept_values_are_the_jobs_hydra_overrides(tmp_path: Path) -> None:
    """In a multirun each job's overrides (the swept values) go to every stage run's config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from clims_pl.config import CONF_DIR
    from clims_pl.dashboard import swept_values

    assert swept_values() == {}  # no Hydra job: nothing swept
    overrides = ["experiment=toy_ablation", "pipeline.set.clims.loss.alpha=10", f"paths.root_dir={tmp_path}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("reproduce", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert swept_values()["pipeline.set.clims.loss.alpha"] == "10"
        assert swept_values()["experiment"] == "toy_ablation"
    finally:
        HydraConfig.instance().cfg = None
