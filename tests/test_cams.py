"""Multi-scale CAM inference: docs/reference.md#stage-c-cam-inference maps vs a literal per-scale/per-flip loop, resume, DDP, the clims-infer stage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cam_fixtures import write_voc_root
from torch import nn

from clims_pl.cams import CamFileError, load_cam, multiscale_cam, predict_cams, strided_size, strided_up_size
from clims_pl.data.datamodule import MultiScaleDataset
from clims_pl.data.voc import VOC_CLASSES, image_labels
from clims_pl.models.cam_net import CAMNet
from clims_pl.provenance import ProvenanceError
from clims_pl.stages.cams import run

SCALES = (1.0, 0.5, 1.5, 2.0)
CPU = {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def net() -> CAMNet:
    torch.manual_seed(0)
    net = CAMNet("resnet18", num_classes=20, pretrained=False).eval()
    with torch.no_grad():  # mostly positive logits with spatial variation, so every class map is non-trivial
        net.classifier.weight.normal_(0.01, 0.05)
    return net


def _reference_maps(net: nn.Module, pairs: list[torch.Tensor], size: tuple[int, int], keys: list[int]):
    """docs/reference.md#stage-c-cam-inference written out literally: one forward per scale and flip, all 20 classes resized, then keys kept."""
    outputs = []
    for pair in pairs:
        with torch.no_grad():
            image, flipped = F.relu(net(pair[:1]))[0], F.relu(net(pair[1:]))[0]
        outputs.append(image + flipped.flip(-1))

    def resize(o: torch.Tensor, s: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(o[None], s, mode="bilinear", align_corners=False)[0]

    cam = torch.stack([resize(o, strided_size(size)) for o in outputs]).sum(0)[keys]
    high_res = torch.stack([resize(o, strided_up_size(size)) for o in outputs]).sum(0)[:, : size[0], : size[1]][keys]
    cam = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)
    high_res = high_res / (F.adaptive_max_pool2d(high_res, (1, 1)) + 1e-5)
    return cam, high_res


def _pairs(size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(seed))
    out = []
    for s in SCALES:
        scaled = F.interpolate(image[None], (round(size[0] * s), round(size[1] * s)), mode="bilinear")[0]
        out.append(torch.stack([scaled, scaled.flip(-1)]))
    return out


def test_multiscale_cam_matches_literal_reference_loop(net: CAMNet) -> None:
    size, keys = (37, 50), [3, 11, 14]
    pairs = _pairs(size)
    cam, high_res = multiscale_cam(net, pairs, size, keys)
    ref_cam, ref_high = _reference_maps(net, pairs, size, keys)
    assert cam.shape == (3, 10, 13) and high_res.shape == (3, 37, 50)
    torch.testing.assert_close(cam, ref_cam, rtol=0, atol=1e-5)
    torch.testing.assert_close(high_res, ref_high, rtol=0, atol=1e-5)
    assert torch.allclose(high_res.amax(dim=(1, 2)), torch.ones(3), atol=1e-4)  # each map divided by its max


def test_no_ground_truth_class_gives_empty_maps_without_forward(net: CAMNet) -> None:
    cam, high_res = multiscale_cam(nn.Identity(), _pairs((20, 9)), (20, 9), [])
    assert cam.shape == (0, 5, 3) and high_res.shape == (0, 20, 9)


class CountingNet(nn.Module):
    """Counts forwards, to prove finished ids are skipped."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


class LoggedDataset(MultiScaleDataset):
    """Appends '<id> <pid>' to a log per item read, so DDP tests can see which rank computed what."""

    def __init__(self, log: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        with open(self.log, "a") as f:
            f.write(f"{item['id']} {os.getpid()}\n")
        return item


SHAPES = {f"2007_00000{i}": (24 + 3 * i, 40 - 2 * i) for i in range(1, 6)}


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_voc_root(root, SHAPES)
    return root


def _dataset(voc: Path, log: Path, scales=(1.0, 0.5)) -> LoggedDataset:
    ids = list(SHAPES)
    return LoggedDataset(log, voc, ids, image_labels(voc, ids, VOC_CLASSES, None), scales)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_resume_skips_finished_and_recomputes_corrupt(voc: Path, net: CAMNet, tmp_path: Path) -> None:
    out = tmp_path / "cams"
    counting = CountingNet(net)
    stats = predict_cams(counting, _dataset(voc, tmp_path / "log"), out, CPU)
    assert stats["computed"] == 5 and counting.calls == 5 * 2  # one forward per scale, image + flip together
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}

    ids = list(SHAPES)
    truncated, wrong = out / f"{ids[1]}.npz", out / f"{ids[3]}.npz"
    truncated.write_bytes(truncated.read_bytes()[:-50])
    np.savez(wrong, keys=np.zeros(2, np.int64), cam=np.zeros((1, 2, 2)), high_res=np.zeros((1, 5, 5)))
    host, dead_pid = socket.gethostname(), _dead_pid()
    killed = out / f".{ids[0]}.npz.clims-{host}-{dead_pid}.0a1b2c3d.tmp"  # a killed writer's temp
    live = out / f".{ids[2]}.npz.clims-{host}-{os.getpid()}.0a1b2c3d.tmp"  # a concurrent writer's (alive)
    for tmp in (killed, live, out / ".notes.tmp"):
        tmp.write_bytes(b"partial")
    with pytest.raises(CamFileError, match="unreadable"):
        load_cam(truncated)

    counting.calls = 0
    stats = predict_cams(counting, _dataset(voc, tmp_path / "log"), out, CPU)
    assert (stats["computed"], stats["skipped"], counting.calls) == (2, 3, 2 * 2)
    for i in (0, 2, 4):
        assert (out / f"{ids[i]}.npz").stat().st_mtime_ns == mtimes[f"{ids[i]}.npz"]
    assert load_cam(truncated)["high_res"].shape[1:] == SHAPES[ids[1]]
    assert load_cam(wrong)["keys"].shape == (len(load_cam(wrong)["cam"]),)
    assert sorted(p.name for p in out.glob(".*.tmp")) == sorted([live.name, ".notes.tmp"])


def test_written_file_equals_multiscale_cam(voc: Path, net: CAMNet, tmp_path: Path) -> None:
    dataset = _dataset(voc, tmp_path / "log", scales=SCALES)
    predict_cams(net, dataset, tmp_path / "cams", CPU)
    item = dataset[2]
    keys = torch.nonzero(item["label"] > 0.5).flatten()
    cam, high_res = multiscale_cam(net, item["images"], item["size"], keys)
    saved = load_cam(tmp_path / "cams" / f"{item['id']}.npz")
    assert saved["keys"].dtype == np.int64 and saved["keys"].tolist() == keys.tolist()
    assert saved["cam"].dtype == np.float32 and saved["high_res"].shape == (len(keys), *SHAPES[item["id"]])
    np.testing.assert_allclose(saved["high_res"], high_res.numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["cam"], cam.numpy(), atol=1e-6)


@pytest.mark.slow
def test_ddp_spawn_writes_every_id_exactly_once(voc: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = CAMNet("resnet18", num_classes=20, pretrained=False).eval()
    log = tmp_path / "log"
    trainer = {**CPU, "devices": 2, "strategy": "ddp_spawn"}
    stats = predict_cams(tiny, _dataset(voc, log, scales=(1.0,)), tmp_path / "cams", trainer)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert sorted(i for i, _ in rows) == sorted(SHAPES)  # each id read (and so written) by exactly one rank
    assert len({pid for _, pid in rows}) == 2
    assert stats["computed"] == 5 and sorted(p.stem for p in (tmp_path / "cams").glob("*.npz")) == sorted(SHAPES)


def test_run_loads_checkpoint_and_writes_manifest(voc: Path, net: CAMNet, tmp_path: Path, compose_cfg) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    overrides = [
        f"data.root={voc}",
        "data.infer_split=train",
        "data.num_workers=0",
        "data.scales=[1.0,0.5]",
        "model.net.backbone=resnet18",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
    ]
    with pytest.raises(ValueError, match="ckpt is required"):
        run(compose_cfg("infer", overrides))
    out = run(compose_cfg("infer", [*overrides, f"ckpt={ckpt}"]))
    assert out == tmp_path / "run" / "cams"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["ids"] == 5 and manifest["scales"] == [1.0, 0.5]
    assert manifest["ckpt"] == str(ckpt) and len(manifest["config_hash"]) == 16
    keys = load_cam(out / "2007_000001.npz")["keys"]
    assert len(keys) >= 1 and keys.max() < 20
    with pytest.raises(ValueError, match=r"ckpt=.*last.ckpt: does not fit model\.net"):
        run(compose_cfg("infer", [*overrides, f"ckpt={ckpt}", "model.net.backbone=resnet34"]))


def test_infer_into_a_run_of_another_checkpoint_refuses_or_recomputes_all(
    voc: Path, net: CAMNet, tmp_path: Path, compose_cfg
) -> None:
    """Issue: clims-infer into a run dir whose CAMs came from another ckpt skipped every image and then wrote a
    manifest naming the new ckpt. Now: refused (one line naming the folder and overwrite=true), or all recomputed."""
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    torch.save({"state_dict": state}, first)
    torch.save({"state_dict": {k: v + 0.5 if "classifier" in k else v for k, v in state.items()}}, second)
    overrides = [
        f"data.root={voc}",
        "data.infer_split=train",
        "data.num_workers=0",
        "data.scales=[1.0]",
        "model.net.backbone=resnet18",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
    ]
    out = run(compose_cfg("infer", [*overrides, f"ckpt={first}"]))
    assert (tmp_path / "run" / "config.yaml").is_file()  # like every other command
    before = {p.name: p.read_bytes() for p in out.glob("*.npz")}
    assert len(before) == 5
    # Same checkpoint (a copy: same content) resumes: nothing recomputed.
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(first.read_bytes())
    run(compose_cfg("infer", [*overrides, f"ckpt={copy}"]))
    assert json.loads((out / "manifest.json").read_text())["computed"] == 0
    with pytest.raises(ProvenanceError, match=rf"{out} holds CAMs made from other ckpt.*overwrite=true") as err:
        run(compose_cfg("infer", [*overrides, f"ckpt={second}"]))
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in out.glob("*.npz")} == before  # untouched
    run(compose_cfg("infer", [*overrides, f"ckpt={second}", "overwrite=true"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["computed"], manifest["ckpt"]) == (5, str(second))
    after = {p.name: p.read_bytes() for p in out.glob("*.npz")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
