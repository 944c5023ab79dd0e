"""IRNet's class-boundary network (docs/reference.md#irn-network-and-loss, ``resnet50_irn``) on a frozen ImageNet ResNet.

The backbone is the same trunk as :class:`~clims_pl.models.cam_net.CAMNet` (timm ResNet, layer4 stride 1 without
dilation, output stride 16), frozen entirely: eval-mode BN, no gradients, not in the optimiser. Only the
boundary (edge) branch is trained. The displacement branch is omitted: it, its loss and the dp-mean pass only
serve instance segmentation and do not change semantic pseudo labels (quirk docs/reference.md#q17-displacement-branch-unused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clims_pl.cams import strided_size
from clims_pl.models.cam_net import create_trunk, set_layer4_stride1


def _edge_head(in_channels: int, upsample: int) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm(4, 32) → [bilinear ×upsample] → ReLU, as fc_edge1..5."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 1, bias=False), nn.GroupNorm(4, 32)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class IRNet(nn.Module):
    """Frozen ResNet trunk + boundary branch; ``forward`` gives stride-4 edge logits.

    Args:
        backbone: timm ResNet name (``resnet50`` reference, ``resnet18_toy`` for the toy world).
        pretrained / pretrained_tag: as :class:`CAMNet` (reference init = ``tv_in1k``, IRN does **not** start from
            the CAM or CLIMS weights; the toy pipeline passes its CAM checkpoint here, for lack of ImageNet).
        inference_pad: ``None`` (reference): :meth:`edge_map` runs on each image at its own size, as the CLIMS
            snapshot, whose ``EdgeDisplacement.forward`` padding line is commented out. An int zero-pads (the mean
            colour after normalisation) on the right/bottom to that size first, as the final IRN code
            (``crop_size=512``); GroupNorm then sees the padding, so every edge value changes, not only the border.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool | str = True,
        pretrained_tag: str = "tv_in1k",
        inference_pad: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_trunk(backbone, pretrained, pretrained_tag)
        set_layer4_stride1(self.backbone)
        self.backbone.requires_grad_(False)
        self.inference_pad = inference_pad
        channels = [info["num_chs"] for info in self.backbone.feature_info]  # stem, layer1..layer4
        self.edge_heads = nn.ModuleList(_edge_head(c, up) for c, up in zip(channels, (1, 1, 2, 4, 4), strict=True))
        self.edge_out = nn.Conv2d(32 * len(channels), 1, 1, bias=True)
        self.train()

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Detached trunk features at strides 4, 4, 8, 16, 16 (stem after max-pool, layer1..layer4)."""
        trunk = self.backbone
        with torch.no_grad():
            s1 = trunk.maxpool(trunk.act1(trunk.bn1(trunk.conv1(x))))
            s2 = trunk.layer1(s1)
            s3 = trunk.layer2(s2)
            s4 = trunk.layer3(s3)
            s5 = trunk.layer4(s4)
        return [s1, s2, s3, s4, s5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits (N, 1, ceil(H/4), ceil(W/4)); upsampled maps are cropped to the stride-4 size."""
        feats = [head(s) for head, s in zip(self.edge_heads, self.stages(x), strict=True)]
        h, w = feats[1].shape[-2:]
        return self.edge_out(torch.cat([f[..., :h, :w] for f in feats], dim=1))

    @torch.no_grad()
    def edge_map(self, pair: torch.Tensor) -> torch.Tensor:
        """Boundary probability (ceil(H/4), ceil(W/4)) of an image from the pair (image, its h-flip) (2, 3, H, W).

        The logits of both copies are averaged before the sigmoid (reference ``EdgeDisplacement``).
        """
        height, width = pair.shape[-2:]
        if self.inference_pad:
            pad_h, pad_w = max(self.inference_pad - height, 0), max(self.inference_pad - width, 0)
            pair = F.pad(pair, (0, pad_w, 0, pad_h))
        grid_h, grid_w = strided_size((height, width))
        logits = self(pair)[:, 0, :grid_h, :grid_w]
        return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)

    def param_groups(self) -> list[nn.Parameter]:
        """The trainable (boundary-branch) parameters; the backbone is frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> IRNet:
        """The frozen backbone stays in eval mode (running BN statistics) whatever ``mode`` is."""
        super().train(mode)
        self.backbone.eval()
        return self
