"""clims_pl.models.checkpoint: a payload never runs, the reference's files load by value, clear errors.

The reference layouts come from ``tests/data/reference_keys/*.txt`` (key, shape, dtype of each reference
checkpoint, in the reference's order). Every tensor of such a synthetic file holds its own constant (its line
number), so a value check proves which key each parameter was filled from; expanded scalars keep the files tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_overrides
from omegaconf import OmegaConf
from torch import nn

from clims_pl.models.cam_net import CAMNet
from clims_pl.models.checkpoint import CheckpointError, convert, load_net, load_weights, main, read_file, read_state
from clims_pl.models.clip_evaluator import ClipEvaluator
from clims_pl.models.deeplab import DeepLabV2
from clims_pl.models.irn import IRNet

KEYS = Path(__file__).parent / "data" / "reference_keys"
CAM_NET = {"_target_": "clims_pl.models.cam_net.CAMNet", "backbone": "resnet50", "num_classes": 20}
IRN_NET = {"_target_": "clims_pl.models.irn.IRNet", "backbone": "resnet50"}
DEEPLAB = {"_target_": "clims_pl.models.deeplab.DeepLabV2", "backbone": "resnet101", "num_classes": 20}
BLOCK_PARTS = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn"}
BLOCK_PARTS |= {"conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv"}
BLOCK_PARTS |= {"downsample.1": "shortcut.bn"}


def reference_state(name: str, skip: str = "") -> dict[str, torch.Tensor]:
    """A state dict in the exact layout of reference file ``name``; the tensor on line i holds the value i."""
    state = {}
    for number, line in enumerate((KEYS / f"{name}.txt").read_text().splitlines()):
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        if skip and key.startswith(skip):
            continue
        state[key] = torch.tensor(number, dtype=getattr(torch, dtype)).expand(json.loads(shape))
    return state


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def assert_filled(module: nn.Module, source: dict[str, torch.Tensor], name_of) -> None:
    """Every tensor of ``module`` equals the source tensor ``name_of(its name)`` (None: not from the file)."""
    for name, tensor in module.state_dict().items():
        src = name_of(name)
        if src is not None:
            assert torch.equal(tensor, source[src].to(tensor.dtype)), (name, src)


@pytest.mark.parametrize("name", ["res50_cam.pth", "res50_clims.pth"])
def test_reference_cam_and_clims_files_load_into_camnet(tmp_path: Path, name: str) -> None:
    """As ``ckpt`` of clims-infer (and ``model.init_ckpt``): one copy (resnet50.*) of the trunk, BN statistics too."""
    source = reference_state(name)
    net = load_net(OmegaConf.create(CAM_NET), save(source, tmp_path / name))
    assert_filled(net.backbone, source, lambda k: f"resnet50.{k}")
    assert torch.equal(net.classifier.weight, source["classifier.weight"])
    assert float(net.backbone.layer4[2].bn3.running_var[0]) == float(source["resnet50.layer4.2.bn3.running_var"][0])
    init = CAMNet("resnet50", num_classes=20, pretrained=False, bn_mode="train")
    assert "res50_cam.pth" in load_weights(init, tmp_path / name, "model.init_ckpt").name
    torch.testing.assert_close(init.state_dict(), net.state_dict())


def test_reference_irn_file_loads_the_edge_branch(tmp_path: Path) -> None:
    """As ``ckpt`` of the pseudo-label stage: trunk + fc_edge1..6; path indices and displacement branch unused."""
    source = reference_state("res50_irn.pth")
    net = load_net(OmegaConf.create(IRN_NET), save(source, tmp_path / "res50_irn.pth"))
    assert_filled(net.backbone, source, lambda k: f"resnet50.{k}")
    for i, head in enumerate(net.edge_heads, start=1):
        assert_filled(head, source, lambda k, i=i: f"fc_edge{i}.{k}")
    assert_filled(net.edge_out, source, lambda k: f"fc_edge6.{k}")
    assert isinstance(net, IRNet)


def caffe_name(name: str) -> str | None:
    """timm trunk name → the reference DeepLab's (``layer2.0.conv1.weight`` → ``layer3.block1.reduce.conv.weight``)."""
    if name.startswith(("conv1.", "bn1.")):
        return "layer1.conv1." + ("conv." if name.startswith("conv1.") else "bn.") + name.split(".", 1)[1]
    layer, block, rest = name.split(".", 2)
    part, leaf = rest.rsplit(".", 1)
    return f"layer{int(layer[-1]) + 1}.block{int(block) + 1}.{BLOCK_PARTS[part]}.{leaf}"


def test_reference_deeplab_init_and_trained_msc_files(tmp_path: Path) -> None:
    """The init file (no base., no ASPP) is a Caffe trunk's ``pretrained``; a trained MSC file (base.*) a ``ckpt``."""
    init = reference_state("deeplabv1_resnet101-imagenet.pth", skip="aspp.")  # the file holds no ASPP
    init_file = save(init, tmp_path / "deeplabv1_resnet101-imagenet.pth")
    net = DeepLabV2("resnet101", num_classes=20, pretrained=str(init_file), trunk="caffe", msc_scales=())
    assert_filled(net.backbone, init, caffe_name)
    assert 0.005 < float(net.aspp.convs[0].weight.detach().std()) < 0.015  # ASPP keeps its N(0, 0.01) init
    assert net.backbone.layer2[0].conv1.stride == (2, 2) and net.backbone.layer2[0].conv2.stride == (1, 1)

    trained = reference_state("deeplabv2_resnet101_msc.pth")
    net = load_net(OmegaConf.create({**DEEPLAB, "trunk": "caffe"}), save(trained, tmp_path / "final.pth"))
    assert_filled(net.backbone, trained, lambda k: f"base.{caffe_name(k)}")
    for i, conv in enumerate(net.aspp.convs):
        assert_filled(conv, trained, lambda k, i=i: f"base.aspp.c{i}.{k}")

    with pytest.raises(CheckpointError, match=r"ckpt=.*imagenet.pth: does not fit model.net .*missing: aspp.convs.0"):
        load_net(OmegaConf.create({**DEEPLAB, "trunk": "caffe"}), init_file)
    with pytest.raises(CheckpointError, match=r"caffe-style ResNet .* set model.net.trunk=caffe"):
        DeepLabV2("resnet101", num_classes=20, pretrained=str(init_file), msc_scales=())


def test_missing_tensor_and_unknown_layout_are_named(tmp_path: Path) -> None:
    source = reference_state("res50_cam.pth")
    del source["resnet50.layer3.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"model.init_ckpt=.*: does not fit .*missing: backbone.layer3.1.conv2"):
        load_weights(CAMNet("resnet50", pretrained=False), save(source, tmp_path / "cut.pth"), "model.init_ckpt")
    with pytest.raises(
        CheckpointError, match=r"unknown checkpoint layout.*res50_irn.*res50_cam.*deeplabv1.*torchvision"
    ):
        read_state(save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth"))


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_payload_checkpoint_is_refused_by_every_loader_and_never_runs(
    tmp_path: Path, toy_root: Path, compose_cfg
) -> None:
    marker = tmp_path / "payload_ran"
    net = CAMNet("resnet18", num_classes=4, pretrained=False)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": Payload(marker)}, evil)
    small = {"_target_": "clims_pl.models.cam_net.CAMNet", "backbone": "resnet18", "num_classes": 4}
    loaders = {
        "read_state": lambda: read_state(evil),
        "model.init_ckpt": lambda: load_weights(CAMNet("resnet18", 4, pretrained=False), evil, "model.init_ckpt"),
        "clims-infer / pseudo / seg_eval ckpt": lambda: load_net(OmegaConf.create(small), evil),
        "model.net.pretrained": lambda: IRNet("resnet18", pretrained=str(evil)),
        "clims-convert": lambda: convert(evil, tmp_path / "out.ckpt"),
        "clip.pretrained": lambda: ClipEvaluator("clims-tiny-vit", pretrained=str(evil), precision="fp32"),
    }
    for what, load in loaders.items():
        with pytest.raises(CheckpointError, match=r"evil.ckpt: refused, the file holds pickled objects"):
            load()
        assert not marker.exists(), what
    from clims_pl.stages.train import run

    cfg = compose_cfg("train", ["experiment=toy_cam", *toy_overrides(toy_root), f"ckpt_path={evil}"])
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*evil.ckpt: refused"):
        run(cfg)  # Lightning's resume
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*notes.ckpt: not a Lightning checkpoint"):
        run(compose_cfg("train", ["experiment=toy_cam", *toy_overrides(toy_root), f"ckpt_path={text}"]))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unrestricted unpickler runs it
    assert marker.exists()


def test_text_file_as_ckpt_or_clip_weights_is_one_line_naming_it(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"^ckpt=.*notes.txt: not loadable as weights \(.*\)$"):
        read_file(text)
    with pytest.raises(CheckpointError, match=r"^clip.pretrained=.*notes.txt: not loadable as weights"):
        ClipEvaluator("clims-tiny-vit", pretrained=str(text), precision="fp32")


def test_clims_pl_checkpoint_loads_weights_only_and_converted_file_round_trips(
    tmp_path: Path, toy_root: Path, compose_cfg
) -> None:
    """A real clims-train checkpoint holds plain containers only; clims-convert output loads like one."""
    from clims_pl.stages.train import run

    cfg = compose_cfg("train", ["experiment=toy_cam", *toy_overrides(toy_root), "trainer.max_steps=1"])
    run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert read_file(last)["global_step"] == 1
    layout, state = read_state(last)
    assert layout.name.startswith("clims-pl") and "classifier.weight" in state

    source = reference_state("res50_cam.pth")
    converted = tmp_path / "res50_cam.ckpt"
    main([str(save(source, tmp_path / "res50_cam.pth")), str(converted)])
    layout, state = read_state(converted)
    assert layout.name.startswith("clims-pl") and set(state) == set(CAMNet("resnet50", pretrained=False).state_dict())
    assert torch.equal(state["backbone.layer1.0.bn1.running_mean"], source["resnet50.layer1.0.bn1.running_mean"])


class _Unit(nn.Sequential):
    """The reference DeepLab's ``_ConvBnReLU`` (segmentation fork of kazuto1011/deeplab-pytorch)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int, dil: int, relu: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.001))
        if relu:
            self.add_module("relu", nn.ReLU())


class _Bottleneck(nn.Module):
    """Reference ``_Bottleneck``: the stride on the 1×1 ``reduce``, the dilation on the 3×3."""

    def __init__(self, cin: int, cout: int, stride: int, dil: int, downsample: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.reduce = _Unit(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = _Unit(mid, mid, 3, 1, dil, dil)
        self.increase = _Unit(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = _Unit(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class ReferenceDeepLab(nn.Module):
    """Reference ``DeepLabV2`` (stem, layer2..5 strides 1/2/1/1 dilations 1/1/2/4, summed ASPP 6/12/18/24)."""

    def __init__(self, blocks: tuple[int, ...], classes: int = 21) -> None:
        super().__init__()
        self.layer1 = nn.Sequential()
        self.layer1.add_module("conv1", _Unit(3, 64, 7, 2, 3, 1))
        self.layer1.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        cin = 64
        for index, (n, cout, stride, dil) in enumerate(
            zip(blocks, (256, 512, 1024, 2048), (1, 2, 1, 1), (1, 1, 2, 4), strict=True)
        ):
            layer = nn.Sequential()
            for b in range(n):
                block = _Bottleneck(cin if b == 0 else cout, cout, stride if b == 0 else 1, dil, downsample=b == 0)
                layer.add_module(f"block{b + 1}", block)
            self.add_module(f"layer{index + 2}", layer)
            cin = cout
        self.aspp = nn.Module()
        for i, rate in enumerate((6, 12, 18, 24)):
            self.aspp.add_module(f"c{i}", nn.Conv2d(2048, classes, 3, 1, rate, rate, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5):
            x = layer(x)
        return sum(conv(x) for conv in self.aspp.children())


def test_caffe_trunk_computes_what_the_reference_deeplab_computes(tmp_path: Path) -> None:
    """Same logits as the reference module on its own weights (a bottleneck ResNet-26 stands in for ResNet-101)."""
    torch.manual_seed(0)
    reference = ReferenceDeepLab((2, 2, 2, 2)).eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):  # real statistics, so BN mapping errors show
            nn.init.uniform_(module.running_mean, -0.5, 0.5), nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5), nn.init.uniform_(module.bias, -0.2, 0.2)
    path = save(reference.state_dict(), tmp_path / "ref.pth")
    ours = load_net(OmegaConf.create({**DEEPLAB, "backbone": "resnet26", "trunk": "caffe", "msc_scales": []}), path)
    image = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        expected = reference(image)
        torch.testing.assert_close(ours(image), expected)  # identical here (max difference 0.0)
        block = ours.backbone.layer2[0]  # the torchvision placement of the stride computes something else
        block.conv1.stride, block.conv2.stride = (1, 1), (2, 2)
        assert float((ours(image) - expected).abs().max()) > 1e-3
