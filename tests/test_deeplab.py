"""DeepLab-v2 (docs/reference.md#stage-i-deeplab-v2): balanced CE (docs/reference.md#q21-balanced-ce-division), OS-8 MSC outputs, schedule, scores, val/test evaluation."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cam_fixtures import write_voc_root
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clims_pl.dashboard import publish
from clims_pl.data.imageio import VOC_PALETTE, read_label_png, save_label_png
from clims_pl.data.segmentation import SegDataModule, paste_foreground
from clims_pl.metrics import deeplab_scores, pair_confusion
from clims_pl.models.deeplab import DeepLabV2
from clims_pl.modules.seg import SegModule, balanced_cross_entropy, resize_labels
from clims_pl.optim import poly_factor
from clims_pl.stages import seg_eval
from clims_pl.stages.seg_eval import crf_image, evaluate_val, export_test
from clims_pl.stages.train import run as train_run
from clims_pl.viz import GAP, TITLE_HEIGHT


def test_balanced_ce_by_hand() -> None:
    # pixels: background with logits (0, 0) -> CE ln 2; class 1 with logits (0, ln 3) -> p = 3/4; one ignored
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, math.log(3.0), -5.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert balanced_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_ce_finite_without_foreground() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0] = 255
    loss = balanced_cross_entropy(logits, labels)
    assert math.isfinite(loss.item())  # the reference divides 0 by 0 here (docs/reference.md#q21-balanced-ce-division)
    plain = F.cross_entropy(logits, labels, ignore_index=255)
    assert loss.item() == pytest.approx(plain.item() / 2, rel=1e-6)  # the empty foreground half counts 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert balanced_cross_entropy(logits, torch.full((2, 4, 4), 255)).item() == 0.0


def test_balanced_ce_equals_reference_when_both_sets_present() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    labels[0, 0, :2] = 255
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=255)
    bg, fg = labels == 0, (labels != 0) & (labels != 255)
    reference = ((ce * bg).sum() / bg.sum() + (ce * fg).sum() / fg.sum()) / 2
    assert balanced_cross_entropy(logits, labels).item() == pytest.approx(reference.item(), rel=1e-6)


def test_msc_outputs_output_stride_8() -> None:
    torch.manual_seed(0)
    net = DeepLabV2("resnet18", num_classes=4, pretrained=False)
    outs = net(torch.randn(1, 3, 321, 321))
    assert [tuple(o.shape) for o in outs] == [(1, 5, 41, 41), (1, 5, 21, 21), (1, 5, 31, 31), (1, 5, 41, 41)]
    assert torch.equal(outs[3], torch.maximum(outs[0], outs[3]))  # the max dominates the full-scale map
    net.eval()
    out = net(torch.randn(1, 3, 100, 140))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 13, 18)
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    backbone, weights, biases = net.param_groups()
    assert len(weights) == len(biases) == 4
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    assert 0.005 < float(torch.cat([w.flatten() for w in weights]).std()) < 0.015  # N(0, 0.01)
    assert len(backbone) == sum(isinstance(m, torch.nn.Conv2d) for m in net.backbone.modules())


def test_resize_labels_is_pil_nearest() -> None:
    labels = torch.randint(0, 21, (2, 321, 321))
    for size in [(41, 41), (21, 21), (31, 31)]:
        ours = resize_labels(labels, size)
        for i in range(2):
            pil = Image.fromarray(labels[i].numpy().astype(np.uint8)).resize(size[::-1], Image.Resampling.NEAREST)
            assert np.array_equal(ours[i].numpy(), np.asarray(pil))


def test_poly_lr_updates_every_10_steps() -> None:
    def factor(t: int) -> float:
        return poly_factor(t, 30000, 0.9, every=10, final_step=30000)

    assert [factor(t) for t in range(10)] == [1.0] * 10
    assert factor(10) == pytest.approx((1 - 10 / 30000) ** 0.9)
    assert factor(19) == factor(10)
    assert factor(29995) == pytest.approx((1 - 29990 / 30000) ** 0.9)
    assert factor(30000) == factor(30007) == 0.0  # the reference PolynomialLR reaches 0 at iter_max


def test_scores_average_classes_present_in_ground_truth() -> None:
    conf = np.array([[5, 1, 0], [1, 3, 0], [0, 2, 0]])  # class 2 in gt but never predicted; no class absent
    scores = deeplab_scores(conf)
    iou = [5 / 7, 3 / 7, 0.0]
    assert scores["class_iou"] == pytest.approx(iou)
    assert scores["miou"] == pytest.approx(np.mean(iou))
    conf = np.array([[5, 1, 0], [1, 3, 0], [0, 0, 0]])  # class 2 absent from gt: excluded
    assert deeplab_scores(conf)["miou"] == pytest.approx(np.mean([5 / 7, 3 / 5]))
    assert deeplab_scores(conf)["pixel_accuracy"] == pytest.approx(8 / 10)


def test_crf_image_reference_bug() -> None:
    image = np.array([[[0, 0, 0], [200, 130, 110]]], dtype=np.uint8)
    assert crf_image(image, reference_bug=False) is image
    # BGR − (104.008, 116.669, 122.675): (−104.008, −116.669, −122.675) truncates to (−104, −116, −122) → wraps
    wrapped = crf_image(image, reference_bug=True)
    assert wrapped[0, 0].tolist() == [152, 140, 134]
    assert wrapped[0, 1].tolist() == [5, 13, 77]  # (110−104.008, 130−116.669, 200−122.675)


@pytest.fixture
def voc_with_test(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "voc"
    masks = write_voc_root(root, {"v1": (40, 52), "v2": (33, 47), "t1": (45, 30)})
    for image_id, mask in masks.items():  # fold the classes into 1..4, the toy world's class count
        objects = (mask > 0) & (mask < 255)
        mask[objects] = (mask[objects] - 1) % 4 + 1
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation/val.txt").write_text("v1\nv2\n")
    (root / "ImageSets/Segmentation/test.txt").write_text("t1\n")
    return root, masks


def test_val_scores_and_test_export(voc_with_test, tmp_path: Path) -> None:
    root, _ = voc_with_test
    torch.manual_seed(0)
    net = DeepLabV2("resnet18", num_classes=20, pretrained=False).eval()
    crf = {"iterations": 2, "bilateral_sxy": 10}
    kept = tmp_path / "val"
    result = evaluate_val(net, str(root), ["v1", "v2"], gt="voc", crf=crf, save=["v2"], save_dir=kept)
    assert result["num_images"] == 2
    conf = np.asarray(result["confusion"])
    assert conf.shape == (21, 21) and conf.sum() == 40 * 52 + 33 * 47 - 52 - 47  # row 0 of each mask is 255
    assert 0.0 <= result["plain"]["miou"] <= 1.0 and 0.0 <= result["crf"]["miou"] <= 1.0
    # The kept predictions (only v2) are the scored ones: with v1's from its own evaluation they give the scores.
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.png")) == ["crf/v2.png", "plain/v2.png"]
    alone = evaluate_val(net, str(root), ["v1"], gt="voc", crf=crf, save=["v1"], save_dir=kept)
    masks = {i: read_label_png(root / "SegmentationClass" / f"{i}.png") for i in ("v1", "v2")}
    for kind in ("plain", "crf"):
        total = sum(pair_confusion(read_label_png(kept / kind / f"{i}.png"), masks[i], 21) for i in masks)
        assert deeplab_scores(total) == result[kind]
    assert np.array_equal(pair_confusion(read_label_png(kept / "plain/v1.png"), masks["v1"], 21), alone["confusion"])
    archive = export_test(net, str(root), ["t1"], tmp_path / "seg", crf=crf, reference_bug=True)
    png = tmp_path / "seg" / "results/VOC2012/Segmentation/comp5_test_cls/t1.png"
    with Image.open(png) as img:
        assert img.mode == "P" and img.size == (30, 45)
        palette = np.asarray(img.getpalette()[: 3 * 256]).reshape(256, 3)
        assert np.array_equal(palette[:21], VOC_PALETTE[:21])
        assert np.asarray(img).max() <= 20
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["results/VOC2012/Segmentation/comp5_test_cls/t1.png"]


def test_toy_seg_trains_then_evaluates(voc_with_test, tmp_path: Path, compose_cfg) -> None:
    root, _ = voc_with_test
    cfg = compose_cfg(
        "train",
        [
            "experiment=toy_seg",
            f"data.root={root}",
            f"data.label_dir={root / 'SegmentationClass'}",
            "data.train_split=train",
            "data.val_gt=voc",
            "data.batch_size=2",
            "data.crop_size=64",
            "data.num_workers=0",
            "trainer.max_steps=2",
            "trainer.check_val_every_n_epoch=1",
            "logger=csv",
        ],
    )
    metrics = train_run(cfg)
    assert metrics["global_step"] == 2
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/miou"] <= 1.0
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_cfg = compose_cfg(
        "refine",
        [
            "model=seg",
            f"data.root={root}",
            f"ckpt={ckpt}",
            "+trunk@model.net=toy",  # the architecture experiment=toy_seg trained (as experiment=toy_demo does)
            "data.classes=[aeroplane,boat,cow,train]",
            "data.prompts=toy",  # the bank of these classes (publish names them)
            "seg_eval.val_gt=voc",
            "seg_eval.device=cpu",
            "seg_eval.num_workers=0",
            "seg_eval.crf.params.iterations=1",
            "seg_eval.save_val=1",
            "logger=tensorboard",
        ],
    )
    result = seg_eval.run(eval_cfg)
    assert result["plain"]["miou"] is not None and "crf" in result
    assert Path(eval_cfg.seg_eval.metrics_path).is_file()
    assert Path(result["test_archive"]).is_file()
    # The first save_val=1 val id keeps its predictions and a panel image | prediction | CRF | ground truth.
    out = Path(eval_cfg.seg_eval.out_dir)
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/**/*.png")) == [
        "overlays/seg_val/v1.png",
        "results/VOC2012/Segmentation/comp5_test_cls/t1.png",
        "seg_val/crf/v1.png",
        "seg_val/plain/v1.png",
    ]
    panel = np.asarray(Image.open(out / "overlays/seg_val/v1.png"))
    assert panel.shape == (40 + TITLE_HEIGHT, 4 * 52 + 3 * GAP, 3)
    for tile, label in ((1, "plain"), (2, "crf"), (3, None)):  # tiles after the image, at full size (52 x 40)
        x = tile * (52 + GAP)
        expected = read_label_png(
            root / "SegmentationClass/v1.png" if label is None else out / f"seg_val/{label}/v1.png"
        )
        assert np.array_equal(panel[TITLE_HEIGHT:, x : x + 52], VOC_PALETTE[expected])
    # The dashboard logs the panel as an image (read back from the TensorBoard event file).
    publish("seg_eval", out, eval_cfg)
    events = EventAccumulator(str(out / "dashboard" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["seg_eval/images/overlays/seg_val/v1"]
    assert events.Scalars("seg_eval/seg_val/plain/miou")[0].value == pytest.approx(result["plain"]["miou"])
    # A rerun keeping none clears what the earlier settings kept.
    eval_cfg.seg_eval.save_val, eval_cfg.seg_eval.test_split = 0, None
    seg_eval.run(eval_cfg)
    assert not list((out / "seg_val").rglob("*.png")) and not list((out / "overlays").rglob("*.png"))


def test_caffe_trunk_refuses_imagenet_normalised_data_and_hub_weights() -> None:
    from types import SimpleNamespace

    net = DeepLabV2("resnet50", num_classes=4, pretrained=False, trunk="caffe", msc_scales=())
    assert net.input_normalization == "caffe_bgr"
    module = SegModule(net, optim={})
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(normalization="imagenet"))
    with pytest.raises(ValueError, match=r"data.normalization=imagenet does not fit model.net.trunk=caffe.*caffe_bgr"):
        module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(normalization="caffe_bgr"))
    module.setup("fit")
    with pytest.raises(ValueError, match=r"trunk=caffe has no hub weights.*deeplabv1_resnet101-imagenet.pth"):
        DeepLabV2("resnet101", pretrained=True, trunk="caffe")
    with pytest.raises(ValueError, match=r"trunk=caffe needs a bottleneck ResNet"):
        DeepLabV2("resnet18", pretrained=False, trunk="caffe")


def test_paste_foreground_by_hand() -> None:
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 0]], [[2, 0], [0, 255]]])
    pasted, new = paste_foreground(images, labels, p=1.0)
    # With two crops each is the other's donor: its foreground (not background, not 255) lands at the same place.
    assert new.tolist() == [[[2, 1], [255, 0]], [[2, 1], [0, 255]]]
    expected = images.clone()
    expected[0, :, 0, 0], expected[1, :, 0, 1] = images[1, :, 0, 0], images[0, :, 0, 1]
    assert torch.equal(pasted, expected)
    assert paste_foreground(images, labels, p=0.0)[1] is labels and paste_foreground(images[:1], labels[:1], 1.0)[
        1
    ].equal(labels[:1])
    # Never a crop's own foreground: with three crops whose foregrounds sit apart, each gets exactly one other's.
    labels3 = torch.zeros(3, 1, 3, dtype=torch.long)
    for i in range(3):
        labels3[i, 0, i] = i + 1
    for seed in range(10):
        torch.manual_seed(seed)
        got = paste_foreground(torch.zeros(3, 3, 1, 3), labels3, p=1.0)[1]
        for i in range(3):
            assert got[i, 0, i] == i + 1 and (got[i] > 0).sum() == 2


def test_copy_paste_only_on_training_batches(tmp_path: Path) -> None:
    dm = SegDataModule(tmp_path, tmp_path, ["a"], batch_size=2, num_workers=0, copy_paste=1.0)
    batch = {"image": torch.zeros(2, 3, 1, 2), "label": torch.tensor([[[1, 0]], [[0, 0]]])}

    class _Trainer:
        training = False

    dm.trainer = _Trainer()  # type: ignore[assignment]
    assert dm.on_after_batch_transfer(dict(batch), 0)["label"].tolist() == [[[1, 0]], [[0, 0]]]
    dm.trainer.training = True
    assert dm.on_after_batch_transfer(dict(batch), 0)["label"].tolist() == [[[1, 0]], [[1, 0]]]
    with pytest.raises(ValueError, match=r"data\.copy_paste"):
        SegDataModule(tmp_path, tmp_path, ["a"], copy_paste=1.5)
