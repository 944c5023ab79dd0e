"""CAMNet: the ResNet classifier whose per-pixel class scores are the CAMs (docs/reference.md#backbones).

The reference ResNet-50 has strides (2, 2, 2, 1): layer4 keeps stride 1 *without* dilation, giving output stride 16.
timm's ``output_stride=16`` would dilate layer4 instead, which changes the receptive field and the numbers, so we
build the plain timm ResNet and set layer4's first-block strides to 1 ourselves.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from clims_pl.models.checkpoint import load_weights

BNMode = Literal["fixed", "train"]


class CAMNet(nn.Module):
    """ResNet trunk at output stride 16 + a bias-free 1×1 classifier.

    Args:
        backbone: a timm ResNet name (``resnet50`` reference; ``resnet18`` for toys and tests).
        num_classes: foreground classes (no background channel).
        pretrained: ``True`` loads timm's ``<backbone>.<pretrained_tag>`` weights, a path loads a local file
            (timm/torchvision weights, or a clims-pl checkpoint whose trunk is taken), ``False`` keeps random init
            (tests, or weights that come from a checkpoint anyway).
        pretrained_tag: timm tag; ``tv_in1k`` = torchvision's original ImageNet weights, the reference init.
        bn_mode: ``fixed`` — BN always uses its stored statistics (reference FixedBatchNorm, baseline CAM);
            ``train`` — ordinary BatchNorm, batch statistics in training (CLIMS, quirk docs/reference.md#q6-trainable-batchnorm).
        freeze_stem: conv1/bn1 get no gradient (reference freezes the stem in both CAM and CLIMS).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 20,
        pretrained: bool | str = True,
        pretrained_tag: str = "tv_in1k",
        bn_mode: BNMode = "fixed",
        freeze_stem: bool = True,
    ) -> None:
        super().__init__()
        if bn_mode not in ("fixed", "train"):
            raise ValueError(f"model.net.bn_mode must be 'fixed' or 'train', got {bn_mode!r}")
        self.bn_mode = bn_mode
        self.backbone = create_trunk(backbone, pretrained, pretrained_tag)
        set_layer4_stride1(self.backbone)
        self.classifier = nn.Conv2d(self.backbone.num_features, num_classes, kernel_size=1, bias=False)
        if freeze_stem:
            for module in (self.backbone.conv1, self.backbone.bn1):
                module.requires_grad_(False)
        self.train()

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-16 trunk features (N, F, ceil(H/16), ceil(W/16))."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits (N, C, ceil(H/16), ceil(W/16)): the classifier applied without pooling."""
        return self.classifier(self.features(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Image logits (N, C): global average pooling then the classifier (reference stage A)."""
        pooled = self.features(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Trainable (backbone, classifier) parameters; the classifier gets a 10× learning rate in the reference."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        classifier = [p for p in self.classifier.parameters() if p.requires_grad]
        return backbone, classifier

    def train(self, mode: bool = True) -> CAMNet:
        """In ``fixed`` BN mode every BN layer stays in eval mode, so its statistics never change."""
        super().train(mode)
        if self.bn_mode == "fixed":
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def create_trunk(backbone: str, pretrained: bool | str, tag: str, trunk: str = "torchvision") -> nn.Module:
    """timm ResNet without head; pretrained weights from the hub (tag) or a local file, with a clear offline error.

    A local file is read by :mod:`clims_pl.models.checkpoint` (weights only): a torchvision/timm ImageNet file, a
    reference checkpoint, or a clims-pl checkpoint whose trunk is taken — the toy pipeline starts IRN and DeepLab
    from the trained toy baseline CAM's trunk (``model.net.pretrained=<cam run>/last.ckpt``), its stand-in for
    ImageNet weights. ``trunk`` is the ResNet style the caller builds (``caffe`` for the reference DeepLab).
    """
    if not backbone.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"model.net.backbone={backbone!r}: CAMNet expects a timm ResNet (resnet50, resnet18, ...)")
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if isinstance(pretrained, str | os.PathLike) and str(pretrained) not in ("", "False", "false"):
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        load_weights(model, pretrained, "model.net.pretrained", prefix="backbone.", trunk=trunk)
        return model
    if pretrained is True:
        kwargs["pretrained"] = True
        name = f"{backbone}.{tag}" if tag else backbone
    else:
        kwargs["pretrained"] = False
        name = backbone
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError) as err:  # hub unreachable, not in cache, HF_HUB_OFFLINE ...
        if not kwargs["pretrained"]:
            raise
        raise RuntimeError(
            f"cannot load pretrained weights for {name!r} ({type(err).__name__}). Offline? Download them where there is "
            "internet (python -c \"import timm; timm.create_model('" + name + "', pretrained=True)\" fills the HF "
            "cache; copy HF_HOME here) or pass model.net.pretrained=/path/to/weights.pth"
        ) from err


@register_model
def resnet18_toy(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 at half width (channels 32–256, 4× fewer FLOPs): the toy world's trunk for every network.

    Registered with timm so configs name it like any timm ResNet (``model.net.backbone: resnet18_toy``); it is
    what fits the whole toy pipeline in `make demo`'s 15 minutes on 2 CPU cores. No hub weights exist.
    """
    args = {"block": BasicBlock, "layers": (2, 2, 2, 2), "channels": (32, 64, 128, 256), "stem_width": 32}
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"num_classes": 0}  # no hub weights: no warning
    return build_model_with_cfg(ResNet, "resnet18_toy", pretrained, **{**args, **kwargs})


def set_layer4_stride1(trunk: nn.Module) -> None:
    """Make layer4 keep resolution with no dilation (reference strides (2,2,2,1), output stride 16)."""
    first_block = trunk.layer4[0]
    for module in first_block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        if isinstance(module, nn.AvgPool2d | nn.MaxPool2d) and module.stride not in (1, (1, 1)):
            raise ValueError("layer4 with pooled downsampling is not supported (reference uses a strided 1×1 conv)")
