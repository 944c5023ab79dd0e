"""Every checkpoint clims-pl reads: weights only, never pickled code, reference layouts recognised by their keys.

One place owns checkpoint reading so that one rule holds everywhere: files are opened with
``torch.load(weights_only=True)`` (a file that would unpickle anything but tensors and plain containers is
refused before any of it runs), and a file is recognised by its key layout, not by its name:

* clims-pl: a Lightning checkpoint (network under ``net.``) or such a network's state dict (``backbone.*`` ...);
* the reference's ``res50_cam.pth`` / ``res50_clims.pth`` (``net/resnet50_cam.py``, ``net/resnet50_clims.py``),
  ``res50_irn.pth`` (``net/resnet50_irn.py``, edge branch only), the DeepLab init
  ``deeplabv1_resnet101-imagenet.pth`` and trained DeepLab-MSC checkpoints (``base.*``, segmentation fork);
* a torchvision / timm ImageNet ResNet (trunk only: ``model.net.pretrained``).

Reference files register one backbone under several prefixes (``resnet50.*``, ``stage1..4.*``, ``backbone.*``);
one copy is taken (``resnet50.*``). BatchNorm running statistics are kept. Loads are strict: a missing, extra or
misshapen tensor is an error naming it (only ``num_batches_tracked``, unused by clims-pl, may be absent).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from clims_pl.io import atomic_path

Rename = tuple[str, str | Callable[[re.Match[str]], str]]
_BLOCK_PARTS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3")}
_BLOCK_PARTS["shortcut"] = ("downsample.0", "downsample.1")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: refused, unreadable, of an unknown layout, or not fitting the model."""


def _caffe_block(match: re.Match[str]) -> str:
    """``layer3.block2.reduce.bn.weight`` (DeepLab ResNet) → ``backbone.layer2.1.bn1.weight`` (timm ResNet)."""
    layer, block, part, kind, rest = match.groups()
    conv, bn = _BLOCK_PARTS[part]
    return f"backbone.layer{int(layer) - 1}.{int(block) - 1}.{conv if kind == 'conv' else bn}.{rest}"


_RES50 = (r"^resnet50\.(?!fc\.)(.+)$", r"backbone.\1")
_CAFFE_TRUNK: tuple[Rename, ...] = (
    (r"^layer1\.conv1\.conv\.(.+)$", r"backbone.conv1.\1"),
    (r"^layer1\.conv1\.bn\.(.+)$", r"backbone.bn1.\1"),
    (r"^layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(.+)$", _caffe_block),
    (r"^aspp\.c(\d+)\.(.+)$", r"aspp.convs.\1.\2"),
)


@dataclass(frozen=True)
class Layout:
    """A checkpoint key layout: how to recognise it and how its keys map to clims-pl's network names."""

    name: str
    marker: str  # a key only this layout has
    renames: tuple[Rename, ...]  # first matching pattern wins; keys matching none are not needed (dropped)
    trunk: str | None  # bottleneck style of its ResNet (torchvision: stride on the 3×3, caffe: on the 1×1)
    strip: str = ""  # prefix removed before renaming

    def convert(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix(self.strip)
            for pattern, repl in self.renames:
                match = re.match(pattern, key)
                if match:
                    out[repl(match) if callable(repl) else match.expand(repl)] = value
                    break
        return out


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="clims-pl network (Lightning checkpoint with net.* keys, or its state dict)",
        marker="backbone.conv1.weight",
        renames=((r"^(.+)$", r"\1"),),
        trunk=None,
    ),
    Layout(
        name="reference res50_irn.pth (net/resnet50_irn.py: trunk + edge branch fc_edge1..6)",
        marker="fc_edge6.weight",
        renames=(
            _RES50,
            (r"^fc_edge([1-5])\.(.+)$", lambda m: f"edge_heads.{int(m[1]) - 1}.{m[2]}"),
            (r"^fc_edge6\.(.+)$", r"edge_out.\1"),
        ),
        trunk="torchvision",
    ),
    Layout(
        name="reference res50_cam.pth / res50_clims.pth (net/resnet50_cam.py, net/resnet50_clims.py)",
        marker="resnet50.conv1.weight",
        renames=(_RES50, (r"^classifier\.weight$", "classifier.weight")),
        trunk="torchvision",
    ),
    Layout(
        name="reference trained DeepLabV2_ResNet101_MSC checkpoint (base.* keys)",
        marker="base.layer1.conv1.conv.weight",
        renames=_CAFFE_TRUNK,
        trunk="caffe",
        strip="base.",
    ),
    Layout(
        name="reference DeepLab init deeplabv1_resnet101-imagenet.pth (Caffe/MSRA ResNet-101, keys without base.)",
        marker="layer1.conv1.conv.weight",
        renames=_CAFFE_TRUNK,
        trunk="caffe",
    ),
    Layout(
        name="torchvision / timm ImageNet ResNet (conv1.*, layer1.0.*, fc.*)",
        marker="layer1.0.conv1.weight",
        renames=((r"^(?!fc\.)(.+)$", r"backbone.\1"),),
        trunk="torchvision",
    ),
)


def load_error(key: str, path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """One line naming the setting and the file for an error raised while unpickling it (also used for CLIP)."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    if "Weights only load failed" in str(err):
        return CheckpointError(
            f"{key}={path}: refused, the file holds pickled objects other than tensors and plain containers "
            "(clims-pl never unpickles code from a checkpoint); re-save only its state_dict from a trusted session"
        )
    return CheckpointError(f"{key}={path}: not loadable as weights ({type(err).__name__}: {first or 'empty'})")


def read_file(path: str | os.PathLike, key: str = "ckpt") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with one-line errors naming ``key`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such checkpoint file (train one with clims-train, or fix the path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # every unpickling failure (refused global, text, truncated ...) is the same news
        raise load_error(key, path, err) from err


def read_state(path: str | os.PathLike, key: str = "ckpt") -> tuple[Layout, dict[str, torch.Tensor]]:
    """The file's layout and its tensors under clims-pl network names (``backbone.*``, ``classifier.*`` ...)."""
    obj = read_file(path, key)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{key}={path}: neither a state dict nor a Lightning checkpoint")
    if any(str(k).startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    for layout in LAYOUTS:
        if layout.marker in state:
            return layout, layout.convert(state)
    known = "; ".join(layout.name for layout in LAYOUTS)
    raise CheckpointError(
        f"{key}={path}: unknown checkpoint layout (first key {next(iter(state), None)!r}); expected {known}"
    )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def load_weights(
    module: nn.Module, path: str | os.PathLike, key: str = "ckpt", *, prefix: str = "", trunk: str = "torchvision"
) -> Layout:
    """Strictly load the file's ``prefix`` part into ``module`` (``prefix="backbone."`` for a bare trunk).

    ``trunk`` is the module's ResNet style: a file of the other style (a Caffe DeepLab file into a torchvision
    trunk, or the reverse) is refused, since the weights would load but compute something else.
    """
    layout, state = read_state(path, key)
    if layout.trunk and layout.trunk != trunk:
        raise CheckpointError(
            f"{key}={path} is a {layout.trunk}-style ResNet ({layout.name}) but the model's trunk is {trunk}-style; "
            f"set model.net.trunk={layout.trunk} (DeepLab) or pass a file of the other layout"
        )
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in wanted]
    shapes = [
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what}: {_few(keys)}"
        for what, keys in (("missing", missing), ("unexpected", extra), ("shape", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{key}={path}: does not fit model.net ({layout.name}; {'; '.join(problems)}); use the model options "
            "(backbone, classes, trunk) the checkpoint was trained with"
        )
    module.load_state_dict(state, strict=False)
    return layout


def load_net(net_cfg: DictConfig, ckpt: str | os.PathLike, key: str = "ckpt") -> nn.Module:
    """Build ``model.net`` without pretrained weights and load checkpoint ``ckpt`` into it strictly; eval mode."""
    net = instantiate(net_cfg, pretrained=False)
    load_weights(net, ckpt, key, trunk=getattr(net, "trunk", "torchvision"))
    return net.eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Layout:
    """Write ``src`` (any known layout) as a clims-pl checkpoint ``{"state_dict": {"net.*": ...}}`` at ``dst``."""
    layout, state = read_state(src, "src")
    with atomic_path(Path(dst)) as tmp:
        torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "converted_from": str(src)}, tmp)
    return layout


def main(argv: list[str] | None = None) -> None:
    """``clims-convert SRC DST``: a reference checkpoint as a clims-pl one (same tensors, clims-pl names)."""
    parser = argparse.ArgumentParser(prog="clims-convert", description=main.__doc__)
    parser.add_argument("src", help="reference file (res50_cam.pth, res50_irn.pth, deeplabv1_*.pth ...)")
    parser.add_argument("dst", help="output .ckpt, usable as ckpt=, model.init_ckpt= or model.net.pretrained=")
    args = parser.parse_args(argv)
    try:
        layout = convert(args.src, args.dst)
    except (CheckpointError, FileNotFoundError) as err:
        parser.exit(2, f"clims-convert: {err}\n")
    print(f"{args.src}: {layout.name} -> {args.dst}")


if __name__ == "__main__":
    main()
