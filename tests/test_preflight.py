"""Preflight of experiment=paper_voc: the real stage graph and configs on a generated 20-class VOC-shaped root
(random weights, crops and batches CPU-sized), plus the overlay and estimate arithmetic on their own."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from cam_fixtures import write_voc_dataset
from conftest import TOY_PARAMS, compose_config
from omegaconf import OmegaConf, open_dict

from clims_pl.data.toy import BACKGROUND_DIR, TOY_META, generate_toy
from clims_pl.data.voc import read_split
from clims_pl.pipeline import compose_stage, config_hash, stages_from_config
from clims_pl.preflight import (
    STEPS_FILE,
    dataset_classes,
    ensure_toy_world,
    miniature,
    split_sizes,
    subset_root,
    training_overlay,
    weights_overlay,
)
from clims_pl.stages.reproduce import run

#: The real architectures at sizes two CPU cores train in seconds (crops, batches, workers, random-walk pad).
CPU_SIZES = {
    "cam": {"data": {"crop_size": 64, "resize_long": [64, 96], "num_workers": 0}},
    "clims": {"data": {"crop_size": 64, "resize_long": [64, 96], "num_workers": 0, "batch_size": 2}},
    "cams": {"data": {"num_workers": 0}},
    "eval_cams": {"eval": {"num_threads": 1}},
    "ir_labels": {"ir_labels": {"num_workers": 1}},
    "irn": {"data": {"crop_size": 96, "num_workers": 0}},  # the radius-10 path index needs a 24-cell grid
    "pseudo": {"pseudo": {"num_workers": 0, "device": "cpu"}, "model": {"net": {"inference_pad": 96}}},
    "seg": {"data": {"crop_size": 65, "batch_size": 2, "num_workers": 0}},
    "seg_eval": {"seg_eval": {"num_workers": 0, "device": "cpu"}},
}
TRAINING = ("cam", "clims", "irn", "seg")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    write_voc_dataset(root, n_train=6, n_val=5)
    return root


def test_subset_root_takes_the_first_ids_and_keeps_train_inside_train_aug(voc_root: Path, tmp_path: Path) -> None:
    subset = subset_root(voc_root, tmp_path, 4)
    assert read_split(subset, "train") == read_split(voc_root, "train")[:4] == read_split(subset, "train_aug")
    assert read_split(subset, "val") == read_split(voc_root, "val")[:4]
    assert (subset / "SegmentationClassAug" / "2007_000006.png").resolve() == voc_root / "SegmentationClassAug" / (
        "2007_000006.png"
    )
    assert subset_root(voc_root, tmp_path, 4) == subset
    assert subset_root(voc_root, tmp_path, 3) != subset and not subset.exists()  # another selection, a new folder
    # The estimates use VOC's split sizes when the root is smaller.
    assert split_sizes(voc_root, None) == {"train": 6, "val": 5, "train_aug": 6}
    from clims_pl.data.voc import VOC_CLASSES

    assert split_sizes(voc_root, list(VOC_CLASSES)) == {"train": 1464, "val": 1449, "train_aug": 10582}


def test_training_overlay_validates_once_after_the_last_step() -> None:
    seg = OmegaConf.create({"data": {"batch_size": 10}, "trainer": {"accumulate_grad_batches": 2}})
    over = training_overlay(seg, images=8, steps=2)
    # batch capped at the 8 images: 1 batch per epoch, 2 steps × 2 accumulated batches = 4 epochs.
    assert over["data.batch_size"] == 8 and over["trainer.check_val_every_n_epoch"] == 4
    assert over["trainer.max_steps"] == 2 and over["trainer.max_epochs"] == -1
    cam = OmegaConf.create({"data": {"batch_size": 2}, "trainer": {}})
    assert training_overlay(cam, images=8, steps=5)["trainer.check_val_every_n_epoch"] == 2  # ⌈5 / 4⌉


def test_weights_are_used_when_on_disk_and_random_otherwise(compose_cfg, monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    irn = compose_cfg("train", ["experiment=paper_voc_irn", "data.label_dir=x"])
    clims = compose_cfg("train", ["experiment=paper_voc_clims"])
    assert weights_overlay(irn, "auto") == (
        {"model.net.pretrained": False},
        ["resnet50 random init (no local weights)"],
    )
    assert weights_overlay(irn, "pretrained") == ({}, ["resnet50.tv_in1k (download)"])
    assert weights_overlay(clims, "random") == ({"clip.pretrained": None}, ["ViT-B-32-quickgelu random init"])
    # timm's weights in the Hugging Face cache layout: found, so used.
    snapshot = tmp_path / "hub" / "models--timm--resnet50.tv_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    assert weights_overlay(irn, "auto") == ({}, ["resnet50.tv_in1k (on disk)"])
    local = tmp_path / "clip.pt"
    local.write_bytes(b"")
    clims.clip.pretrained = str(local)
    assert weights_overlay(clims, "auto") == ({}, [f"ViT-B-32-quickgelu {local} (on disk)"])


@pytest.mark.slow
def test_paper_voc_preflight_end_to_end(voc_root: Path, tmp_path: Path) -> None:
    args = ["experiment=paper_voc", f"data.root={voc_root}", "preflight=true", "preflight_images=4"]
    cfg = compose_config("reproduce", tmp_path, [*args, "preflight_weights=random"])
    with open_dict(cfg):
        cfg.pipeline.set = OmegaConf.merge(OmegaConf.to_container(cfg.pipeline.set), CPU_SIZES)
    manifests = run(cfg)
    out = tmp_path / "runs" / "paper_voc_preflight"
    assert not (tmp_path / "runs" / "paper_voc").exists()
    assert list(manifests) == list(cfg.pipeline.stages)  # the real graph: cam … seg_eval, report
    for name in TRAINING:
        assert manifests[name]["metrics"]["global_step"] == 2, name
        assert (out / name / "checkpoints" / "last.ckpt").is_file()
    assert "val/loss" in manifests["cam"]["metrics"]  # validation ran once, after the last step
    # Hand-offs on the 4 train_aug ids, as in the real run.
    train_aug = read_split(out / "data" / next(p.name for p in (out / "data").iterdir()), "train_aug")
    assert len(train_aug) == 4
    assert sorted(p.stem for p in (out / "cams" / "cams").glob("*.npz")) == train_aug
    assert sorted(p.stem for p in (out / "ir_labels" / "ir_labels").glob("*.png")) == train_aug
    assert sorted(p.stem for p in (out / "pseudo" / "pseudo").glob("*.png")) == train_aug
    assert 0.0 <= manifests["seg_eval"]["metrics"]["crf"]["miou"] <= 1.0
    assert (out / "report" / "report.md").is_file()
    clims = OmegaConf.load(out / "clims" / "config.yaml")
    assert clims.clip.model == "ViT-B-32-quickgelu" and clims.clip.pretrained is None
    assert clims.model.init_ckpt == str(out / "cam" / "checkpoints" / "last.ckpt")
    assert clims.data.num_workers == 0 and len(clims.data.classes) == 20

    table = json.loads((out / "preflight.json").read_text())
    rows = {r["stage"]: r for r in table["stages"]}
    assert list(rows) == list(manifests) and table["split_sizes"]["train_aug"] == 10582
    assert all(rows[n]["wall_s"] == manifests[n]["wall_s"] and rows[n]["host_peak_mb"] > 100 for n in rows)
    # cam: median batch time (first left out) × 16/4 × 5 epochs × ⌊10582/16⌋ = 3,305 batches of 16.
    steps = json.loads((out / "cam" / STEPS_FILE).read_text())
    assert len(steps["batch_seconds"]) == 2
    assert rows["cam"]["estimate_s"] == pytest.approx(steps["batch_seconds"][1] * 16 / 4 * 3305, abs=0.1)
    seg = json.loads((out / "seg" / STEPS_FILE).read_text())["batch_seconds"]
    assert rows["seg"]["estimate_s"] == pytest.approx(statistics.median(seg[1:]) * 30000 * 2, abs=0.1)
    # Per-image stages: wall / images × the real split (cams: train_aug, eval_cams: train, seg_eval: val).
    assert rows["cams"]["estimate_s"] == pytest.approx(rows["cams"]["wall_s"] / 4 * 10582, abs=0.1)
    assert rows["seg_eval"]["estimate_s"] == pytest.approx(rows["seg_eval"]["wall_s"] / 4 * 1449, abs=0.1)
    assert rows["report"]["estimate_s"] is None
    assert "CLIP float16 (clip.precision=fp16; fp16 on cuda)" in rows["clims"]["precision"]
    assert rows["cam"]["precision"] == "32-true (float32 weights, float32 compute)"
    assert rows["clims"]["weights"] == ["ViT-B-32-quickgelu random init"]
    assert rows["cam"]["weights"] == ["resnet50 random init"] and rows["seg"]["weights"] == ["resnet101 random init"]
    assert "| **total** |" in (out / "preflight.md").read_text()

    # No preflight manifest can stand in for a real stage: every stage config differs (data root, run folder).
    real = compose_config("reproduce", tmp_path, ["experiment=paper_voc", f"data.root={voc_root}"])
    for stage in stages_from_config(real.pipeline):
        composed = compose_stage(stage, Path(real.run_dir) / stage.name, tmp_path, [])
        assert config_hash(composed) != manifests[stage.name]["config_hash"], stage.name


def test_preflight_refuses_bad_settings(voc_root: Path, tmp_path: Path) -> None:
    base = ["experiment=paper_voc", f"data.root={voc_root}", "preflight=true"]
    with pytest.raises(ValueError, match="preflight_weights=none: pick one of auto, pretrained, random"):
        run(compose_config("reproduce", tmp_path, [*base, "preflight_weights=none"]))
    with pytest.raises(ValueError, match="drop --from/--only"):
        run(compose_config("reproduce", tmp_path, [*base, "pipeline.from_stage=irn"]))


def test_toy_demo_preflight_trains_the_toy_clip_for_a_few_steps_in_its_own_folder(
    toy_root: Path, tmp_path: Path
) -> None:
    cfg = compose_config("reproduce", tmp_path, ["experiment=toy_demo", f"data.root={toy_root}", "preflight_steps=1"])
    real = {
        s.name: compose_stage(s, s.folder(Path(cfg.run_dir)), tmp_path, []) for s in stages_from_config(cfg.pipeline)
    }
    assert real["toyclip"].trainer.max_steps == 300  # the real run, in the shared folder under .cache/
    mini, _ = miniature(cfg, real, tmp_path / "pre", toy_root)
    stage = next(s for s in stages_from_config(mini.pipeline) if s.name == "toyclip")
    assert stage.folder(tmp_path / "pre") == tmp_path / "pre" / "toyclip"  # the shared folder stays untouched
    small = compose_stage(stage, tmp_path / "pre" / "toyclip", tmp_path, [])
    # At least 2 steps (1 of warm-up: the schedule needs one step of cosine), a tiny evaluation, the step timer.
    assert (small.trainer.max_steps, small.model.optim.warmup_steps) == (2, 1)
    assert (small.toyclip.eval.per_kind, small.toyclip.eval.scenes) == (2, 4)
    assert small.callbacks.preflight_timer._target_ == "clims_pl.preflight.StepTimer"


def test_toy_preflight_runs_every_stage_on_its_subset_of_the_toy_world(toy_root: Path, tmp_path: Path) -> None:
    cfg = compose_config("reproduce", tmp_path, ["experiment=toy_demo", f"data.root={toy_root}"])
    real = {
        s.name: compose_stage(s, s.folder(Path(cfg.run_dir)), tmp_path, []) for s in stages_from_config(cfg.pipeline)
    }
    # The table's split sizes need the class list: the first stage (the toy CLIP) has data without one.
    assert "classes" not in real["toyclip"].data and dataset_classes(real) == ["aeroplane", "boat", "cow", "train"]
    subset = subset_root(toy_root, tmp_path / "pre" / "data", 4)
    ids = read_split(toy_root, "train")[:4] + read_split(toy_root, "val")[:4]
    # The world's parameters and each image's background map come along (the demo reads them) ...
    assert (subset / TOY_META).resolve() == toy_root / TOY_META
    assert sorted(p.stem for p in (subset / BACKGROUND_DIR).iterdir()) == sorted(ids)
    # ... so a toy stage finds its world there and generates nothing into the subset.
    before = sorted(p.relative_to(subset) for p in subset.rglob("*"))
    assert generate_toy(subset, **TOY_PARAMS, progress=False) == subset
    assert sorted(p.relative_to(subset) for p in subset.rglob("*")) == before
    assert read_split(subset, "train_aug") == read_split(toy_root, "train")[:4]
    mini, _ = miniature(cfg, real, tmp_path / "pre", subset)
    reading = [s for s in stages_from_config(mini.pipeline) if "data" in real[s.name] and "root" in real[s.name].data]
    assert {s.name for s in reading} == set(real) - {"toyclip", "report"}
    for stage in reading:
        assert compose_stage(stage, tmp_path / "pre" / stage.name, tmp_path, []).data.root == str(subset), stage.name


def test_ensure_toy_world_generates_the_world_a_toy_stage_would_read(tmp_path: Path) -> None:
    root = tmp_path / "toy"
    elsewhere = OmegaConf.create({"data": {"root": str(tmp_path / "other"), "toy": TOY_PARAMS}})
    no_toy = OmegaConf.create({"data": {"root": str(root), "toy": None}})
    ensure_toy_world(root, {"a": elsewhere, "b": no_toy, "c": OmegaConf.create({"report": {}})})
    assert not root.exists() and not (tmp_path / "other").exists()
    reads = OmegaConf.create({"data": {"root": str(root), "toy": {**TOY_PARAMS, "n_val": 4}}})
    ensure_toy_world(root, {"a": elsewhere, "b": reads})
    assert len(read_split(root, "val")) == 4 and not (tmp_path / "other").exists()
