"""IRN (docs/reference.md#stage-f-irn-training): affinity labels by hand, the affinity loss, the frozen network, and training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cam_fixtures import write_voc_root

from clims_pl.cams import strided_size
from clims_pl.data.affinity import AffinityDataModule, affinity_labels
from clims_pl.data.imageio import save_label_png
from clims_pl.models.irn import IRNet
from clims_pl.modules.irn import IRNModule, affinity_loss
from clims_pl.refine.path_index import PathIndex
from clims_pl.stages.train import run as train_run


def test_affinity_labels_hand_counted() -> None:
    # 8×8: columns 0-3 background, 4-7 class 1, bottom row unsure (255). Radius 2: directions (0,1), (1,-1),
    # (1,0), (1,1); sources rows 0-6 × columns 1-6 (P = 42).
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :, 4:] = 1
    label[:, 7, :] = 255
    index = PathIndex(2, (8, 8))
    assert index.num_sources == 42
    bg, fg, neg = affinity_labels(label, torch.from_numpy(index.src_indices), torch.from_numpy(index.dst_indices), 20)
    per_dir = {
        tuple(d): (int(b.sum()), int(f.sum()), int(n.sum()))
        for d, b, f, n in zip(index.search_dst, bg[0], fg[0], neg[0], strict=True)
    }
    # (0,1): per row x=1,2 bg-bg, x=3 crosses, x=4..6 fg-fg; 7 rows
    assert per_dir[(0, 1)] == (14, 21, 7)
    # (1,0): row 6 reaches the unsure row; rows 0-5: 3 bg + 3 fg
    assert per_dir[(1, 0)] == (18, 18, 0)
    # (1,-1): x=1..3 bg-bg, x=4 lands on column 3 (neg), x=5,6 fg-fg; 6 rows
    assert per_dir[(1, -1)] == (18, 12, 6)
    # (1,1): x=1,2 bg-bg, x=3 lands on column 4 (neg), x=4..6 fg-fg; 6 rows
    assert per_dir[(1, 1)] == (12, 18, 6)
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (62, 69, 19)
    assert int((bg + fg + neg).sum()) == 4 * 42 - 3 * 6  # 18 pairs touch the unsure row
    # labels above num_classes are invalid too: with num_classes=0, class 1 counts as unsure
    bg0, fg0, neg0 = affinity_labels(label, torch.from_numpy(index.src_indices), torch.from_numpy(index.dst_indices), 0)
    assert (int(bg0.sum()), int(fg0.sum()), int(neg0.sum())) == (62, 0, 0)


def test_affinity_loss_by_hand() -> None:
    aff = torch.tensor([[[0.5, 1.0, 0.0, 0.8]]])
    bg = torch.tensor([[[1.0, 0, 0, 0]]])
    fg = torch.tensor([[[0, 1.0, 0, 0]]])
    neg = torch.tensor([[[0, 0, 1.0, 1.0]]])
    out = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    bg_loss = -math.log(0.5 + eps) / (1 + eps)
    fg_loss = -math.log(1.0 + eps) / (1 + eps)
    neg_loss = (-math.log(1 + eps) - math.log(1 + eps - 0.8)) / (2 + eps)
    assert out["bg_pos"].item() == pytest.approx(bg_loss, rel=1e-5)
    assert out["fg_pos"].item() == pytest.approx(fg_loss, abs=1e-7)
    assert out["neg"].item() == pytest.approx(neg_loss, rel=1e-5)
    assert out["total"].item() == pytest.approx(((bg_loss + fg_loss) / 2 + neg_loss) / 2, rel=1e-5)


def test_irnet_frozen_backbone_and_shapes() -> None:
    torch.manual_seed(0)
    net = IRNet("resnet18", pretrained=False, inference_pad=64)
    net.train()
    assert not net.backbone.training
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert {id(p) for p in net.param_groups()} == {
        id(p) for p in [*net.edge_heads.parameters(), *net.edge_out.parameters()]
    }
    logits = net(torch.randn(2, 3, 50, 70))
    assert logits.shape == (2, 1, 13, 18)  # ceil(H/4), ceil(W/4)
    logits.sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.param_groups())
    image = torch.randn(3, 41, 57)
    edge = net.edge_map(torch.stack([image, image.flip(-1)]))
    assert edge.shape == (11, 15) and float(edge.min()) > 0 and float(edge.max()) < 1
    assert [strided_size((n, n))[0] for n in range(1, 13)] == [math.ceil(n / 4) for n in range(1, 13)]


def test_training_steps_lower_the_affinity_loss() -> None:
    torch.manual_seed(0)
    module = IRNModule(IRNet("resnet18", pretrained=False), num_classes=20, optim={}, crop_size=64, radius=5)
    image = torch.randn(4, 3, 64, 64) * 0.3
    image[:, :, :, 32:] += 1.5  # a colour edge between the two label regions
    label = torch.zeros(4, 16, 16, dtype=torch.long)
    label[:, :, 8:] = 3
    optimizer = torch.optim.SGD(module.net.param_groups(), lr=0.03)
    module.train()
    losses = []
    for _ in range(12):
        loss = module.losses(image, label)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses))  # monotone on this fixed batch
    assert losses[-1] < 0.9 * losses[0]


def test_affinity_dataset_item(tmp_path: Path) -> None:
    masks = write_voc_root(tmp_path / "voc", {"a": (60, 90)})
    data = AffinityDataModule(
        tmp_path / "voc", tmp_path / "voc" / "SegmentationClass", ["x"] * 20, "train", 1, 0, crop_size=64
    )
    dataset = data.train_dataloader().dataset
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.int64
    allowed = set(np.unique(masks["a"]).tolist()) | {255}
    assert set(item["label"].unique().tolist()) <= allowed
    save_label_png(tmp_path / "voc" / "SegmentationClass" / "a.png", masks["a"][:, :80])  # another image's label
    with pytest.raises(ValueError, match=r"a\.png: size \(60, 80\) differs from the image's \(60, 90\).*rerun"):
        dataset[0]


def test_toy_irn_experiment_trains(tmp_path: Path, compose_cfg) -> None:
    write_voc_root(tmp_path / "voc", {f"i{k}": (100 + 7 * k, 120) for k in range(4)})
    cfg = compose_cfg(
        "train",
        [
            "experiment=toy_irn",
            f"data.root={tmp_path / 'voc'}",
            f"data.label_dir={tmp_path / 'voc' / 'SegmentationClass'}",
            "data.train_split=train",
            "data.batch_size=2",
            "data.crop_size=96",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "logger=csv",
        ],
    )
    metrics = train_run(cfg)
    assert metrics["global_step"] == 2
    assert math.isfinite(metrics["train/loss"])
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_edge_map_runs_unpadded_by_default_and_padding_changes_interior_values() -> None:
    """docs/reference.md#stage-g-random-walk: the reference snapshot runs the edge net on the image as is; padding (the 512 switch) is not neutral."""
    torch.manual_seed(0)
    net = IRNet("resnet18", pretrained=False).eval()
    assert net.inference_pad is None
    image = torch.randn(3, 41, 57)
    pair = torch.stack([image, image.flip(-1)])
    logits = net(pair)[:, 0]
    expected = torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
    torch.testing.assert_close(net.edge_map(pair), expected)
    net.inference_pad = 64
    padded = net.edge_map(pair)
    # GroupNorm statistics include the padding: values far from the padded border change too.
    assert padded.shape == expected.shape and float((padded - expected)[:4, :4].abs().max()) > 1e-4
