"""DeepLab-v2 with multi-scale inputs (docs/reference.md#deeplab-architecture, ``DeepLabV2_ResNet101_MSC``).

Backbone: the timm ResNet trunk of :class:`~clims_pl.models.cam_net.CAMNet`, made output-stride 8 by removing
the strides of layer3/layer4 and dilating *every* 3×3 conv of those layers by 2 and 4 (the reference dilates all
blocks of a layer, timm's ``output_stride=8`` leaves the first block undilated), with the stem max-pool in
``ceil_mode`` so a 321 crop gives 41/21/31 logit maps at scales 1/0.5/0.75 like the reference.

Two trunk styles (``trunk``): ``caffe`` is the reference's Caffe/MSRA ResNet-101 — the stride of layer2 sits on
the first block's 1×1 ``reduce`` conv, the weights come from ``deeplabv1_resnet101-imagenet.pth`` and the input is
BGR minus the Caffe mean without std (``data.normalization=caffe_bgr``); ``torchvision`` keeps timm's bottleneck
(stride on the 3×3) with torchvision ImageNet weights (``resnet101.tv_in1k``) on ImageNet-normalised RGB.
The module names are timm's in both cases (:mod:`clims_pl.models.checkpoint` maps the reference's names).
All BN layers are frozen: eval mode and γ/β not trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clims_pl.models.cam_net import create_trunk

Trunk = Literal["torchvision", "caffe"]
#: The ``data.normalization`` each trunk's weights expect.
TRUNK_NORMALIZATION = {"torchvision": "imagenet", "caffe": "caffe_bgr"}


class ASPP(nn.Module):
    """DeepLab-v2 ASPP: parallel 3×3 convs with dilation = padding = rate, outputs summed; N(0, 0.01), bias 0."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


def _stride_on_reduce(trunk: nn.Module) -> None:
    """Move each layer's downsampling stride from the first block's 3×3 conv to its 1×1 ``reduce`` (Caffe ResNet)."""
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        block = layer[0]
        if not hasattr(block, "conv3"):
            raise ValueError(
                "model.net.trunk=caffe needs a bottleneck ResNet (resnet101, resnet50 ...), not BasicBlocks"
            )
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Stride 1 everywhere in ``layer`` and dilation = padding = ``dilation`` on each of its 3×3 convs."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


class DeepLabV2(nn.Module):
    """ResNet (OS 8) + ASPP with MSC: training returns [full, 0.5, 0.75, max] logits, eval only the max.

    Args:
        backbone: timm ResNet (``resnet101`` reference, ``resnet18`` for toys).
        num_classes: foreground classes; the head predicts ``num_classes + 1`` (background first).
        pretrained / pretrained_tag: as :class:`CAMNet` (``tv_in1k`` = torchvision ImageNet weights); with
            ``trunk=caffe`` a file (``deeplabv1_resnet101-imagenet.pth``, its trunk; the ASPP keeps its init).
        trunk: ``caffe`` (reference ResNet, stride on the 1×1) or ``torchvision`` (stride on the 3×3).
        atrous_rates: ASPP dilations (6, 12, 18, 24).
        msc_scales: extra input scales of the multi-scale wrapper (0.5, 0.75).
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 20,
        pretrained: bool | str = True,
        pretrained_tag: str = "tv_in1k",
        atrous_rates: Sequence[int] = (6, 12, 18, 24),
        msc_scales: Sequence[float] = (0.5, 0.75),
        trunk: Trunk = "torchvision",
    ) -> None:
        super().__init__()
        if trunk not in TRUNK_NORMALIZATION:
            raise ValueError(f"model.net.trunk must be one of {sorted(TRUNK_NORMALIZATION)}, got {trunk!r}")
        if trunk == "caffe" and pretrained is True:
            raise ValueError(
                "model.net.trunk=caffe has no hub weights: pass model.net.pretrained=<deeplabv1_resnet101-imagenet.pth> "
                "(the reference's init) or false"
            )
        self.trunk = trunk
        self.backbone = create_trunk(backbone, pretrained, pretrained_tag, trunk)
        self.backbone.maxpool.ceil_mode = True
        _dilate(self.backbone.layer3, 2)
        _dilate(self.backbone.layer4, 4)
        if trunk == "caffe":
            _stride_on_reduce(self.backbone)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
        self.aspp = ASPP(self.backbone.num_features, num_classes + 1, atrous_rates)
        self.msc_scales = tuple(msc_scales)
        self.train()

    @property
    def input_normalization(self) -> str:
        """The ``data.normalization`` this trunk's weights expect (``caffe_bgr`` for the Caffe trunk)."""
        return TRUNK_NORMALIZATION[self.trunk]

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """Single-scale logits at output stride 8."""
        return self.aspp(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """MSC: logits of x and of x rescaled by each of ``msc_scales`` (bilinear, floor sizes); the max is
        taken after upsampling the smaller maps to the full one."""
        logits = self.base(x)
        pyramid = [
            self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)) for s in self.msc_scales
        ]
        size = logits.shape[-2:]
        upsampled = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        logits_max = torch.stack([logits, *upsampled]).amax(dim=0)
        if self.training:
            return [logits, *pyramid, logits_max]
        return logits_max

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(backbone conv weights, ASPP weights, ASPP biases): reference lr ×1 / ×10 / ×20 (Caffe lr_mult)."""
        backbone = [m.weight for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        return backbone, [c.weight for c in self.aspp.convs], [c.bias for c in self.aspp.convs]

    def train(self, mode: bool = True) -> DeepLabV2:
        """BN layers stay in eval mode (frozen running statistics) for the whole run (reference ``freeze_bn``)."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self
