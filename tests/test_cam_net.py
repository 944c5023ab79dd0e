"""CAMNet: output stride 16 without dilation, frozen stem, BN modes, checkpoint loading, offline error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clims_pl.models.cam_net import CAMNet
from clims_pl.models.checkpoint import load_weights


@pytest.fixture(scope="module")
def net() -> CAMNet:
    torch.manual_seed(0)
    return CAMNet("resnet18", num_classes=4, pretrained=False)


@pytest.mark.parametrize(("h", "w"), [(64, 80), (65, 97), (33, 16)])
def test_output_stride_is_16_with_ceil(net: CAMNet, h: int, w: int) -> None:
    out = net(torch.randn(1, 3, h, w))
    assert out.shape == (1, 4, -(-h // 16), -(-w // 16))


def test_layer4_has_stride_1_and_no_dilation(net: CAMNet) -> None:
    convs = [m for m in net.backbone.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.stride == (1, 1) and c.dilation == (1, 1) for c in convs)


def test_classify_is_gap_of_pixel_logits(net: CAMNet) -> None:
    # The 1×1 bias-free classifier is linear, so GAP-then-classify equals classify-then-GAP.
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net.classify(x), net(x).mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_stem_gets_no_gradient_and_is_not_a_trainable_group(net: CAMNet) -> None:
    net.zero_grad()
    net.classify(torch.randn(2, 3, 64, 64)).sum().backward()
    assert net.backbone.conv1.weight.grad is None and net.backbone.bn1.weight.grad is None
    assert net.backbone.layer1[0].conv1.weight.grad is not None
    backbone, classifier = net.param_groups()
    assert all(p is not net.backbone.conv1.weight for p in backbone)
    assert classifier == [net.classifier.weight]


def test_fixed_bn_never_updates_statistics() -> None:
    net = CAMNet("resnet18", num_classes=2, pretrained=False, bn_mode="fixed").train()
    before = net.backbone.layer1[0].bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not net.backbone.layer1[0].bn1.training
    torch.testing.assert_close(net.backbone.layer1[0].bn1.running_mean, before)


def test_train_bn_uses_batch_statistics_including_the_frozen_stem() -> None:
    net = CAMNet("resnet18", num_classes=2, pretrained=False, bn_mode="train").train()
    before = net.backbone.bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 5 + 3)
    # Quirk docs/reference.md#q6-trainable-batchnorm: the stem BN has frozen parameters but still tracks batch statistics in train mode.
    assert not torch.allclose(net.backbone.bn1.running_mean, before)
    assert not net.backbone.bn1.weight.requires_grad


def test_state_dict_from_lightning_style_checkpoint(tmp_path, net: CAMNet) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    fresh = CAMNet("resnet18", num_classes=4, pretrained=False)
    load_weights(fresh, path)
    torch.testing.assert_close(fresh.classifier.weight, net.classifier.weight)
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*missing.ckpt: no such checkpoint file"):
        load_weights(fresh, tmp_path / "missing.ckpt")


def test_trunk_initialised_from_a_clims_checkpoint(tmp_path) -> None:
    """IRN/DeepLab may start from a CAM checkpoint's trunk: same weights and BN statistics, strides untouched."""
    from clims_pl.models.deeplab import DeepLabV2

    net = CAMNet("resnet18_toy", num_classes=4, pretrained=False)
    path = tmp_path / "cam.ckpt"
    net.backbone.bn1.running_mean.fill_(0.25)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    seg = DeepLabV2("resnet18_toy", num_classes=4, pretrained=str(path), msc_scales=())
    torch.testing.assert_close(seg.backbone.layer3[0].conv1.weight, net.backbone.layer3[0].conv1.weight)
    assert torch.all(seg.backbone.bn1.running_mean == 0.25)
    assert seg.backbone.layer4[0].conv1.dilation == (4, 4)
    with pytest.raises(ValueError, match=r"model\.net\.pretrained=.*cam.ckpt: does not fit model\.net .*shape"):
        CAMNet("resnet18", num_classes=4, pretrained=str(path))


def test_pretrained_offline_gives_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match=r"cannot load pretrained weights.*model\.net\.pretrained="):
        CAMNet("resnet18", num_classes=2, pretrained=True, pretrained_tag="tv_in1k")
    with pytest.raises(FileNotFoundError, match=r"model\.net\.pretrained=.*nope.pth: no such checkpoint file"):
        CAMNet("resnet18", num_classes=2, pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_from_local_file(tmp_path) -> None:
    src = CAMNet("resnet18", num_classes=2, pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(src.backbone.state_dict(), path)
    loaded = CAMNet("resnet18", num_classes=2, pretrained=str(path))
    torch.testing.assert_close(loaded.backbone.layer3[0].conv1.weight, src.backbone.layer3[0].conv1.weight)
