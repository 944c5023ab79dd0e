"""ClipEvaluator: fused path == reference-order path, frozen CLIP, text encoded once, weights loading rules."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from torch.overrides import TorchFunctionMode

from clims_pl.losses import TERMS, ClimsObjective
from clims_pl.models.cam_net import CAMNet
from clims_pl.models.clip_evaluator import ClipEvaluator, clip_input_size, register_tiny_configs
from clims_pl.prompts.bank import PromptBank

CLASSES = ("cat", "dog", "bird", "person", "boat")
TINY = "clims-tiny-vit"


def _bank(templates=("a photo of {}.",)):
    return PromptBank(
        name="t",
        classes=CLASSES,
        text_names={"person": "player"},
        templates=templates,
        background=("tree", "river", "sea"),
    )


def _evaluator(fused: bool, **kwargs) -> ClipEvaluator:
    torch.manual_seed(0)  # same random CLIP weights for both paths
    return ClipEvaluator(TINY, pretrained=None, precision="fp32", fused=fused, **kwargs)


def _batch():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=g)
    labels = torch.zeros(3, len(CLASSES))
    labels[0, [1, 3]] = 1
    labels[1, 0] = 1
    labels[2, [0, 2, 4]] = 1
    return images, labels


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("templates", [("a photo of {}.",), ("a photo of {}.", "a blurry {}")])
def test_fused_equals_reference_order(templates):
    torch.manual_seed(1)
    net = CAMNet("resnet18", num_classes=len(CLASSES), pretrained=False, bn_mode="train")
    images, labels = _batch()
    results = {}
    for fused in (True, False):
        evaluator = _evaluator(fused)
        objective = ClimsObjective(evaluator, cbs_threshold=0.16)
        objective.set_prompt_bank(_bank(templates))
        model = copy.deepcopy(net)
        out = objective(torch.sigmoid(model(images)), images, labels)
        out["total"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        clip_grads = [p.grad is not None for n, p in evaluator.named_parameters() if n != "clip.logit_scale"]
        results[fused] = (out, grads, clip_grads)
    (fused, fused_grads, fused_clip), (naive, naive_grads, naive_clip) = results[True], results[False]
    assert fused["pairs"].item() == naive["pairs"].item() == 6
    assert 0 < fused["cbs_active"].item() < 1  # the threshold mask really selects a subset here
    for key in (*TERMS, "total"):
        torch.testing.assert_close(fused[key], naive[key], rtol=1e-5, atol=0)
    for a, b in zip(fused_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in fused_grads)
    assert not any(fused_clip)  # frozen CLIP: no parameter gradients in the fused path
    # the reference order computes them all (docs/reference.md#q2-clip-not-frozen); logit_scale is unused
    assert all(naive_clip)


def test_text_encoded_once_and_one_image_pass_per_step():
    images, labels = _batch()
    counts = {}
    for fused in (True, False):
        evaluator = _evaluator(fused)
        evaluator.clip.encode_text = text = _Counter(evaluator.clip.encode_text)
        evaluator.clip.encode_image = image = _Counter(evaluator.clip.encode_image)
        evaluator.set_prompts(_bank().class_prompts(), _bank().background_prompts())
        maps = torch.rand(3, len(CLASSES), 4, 4)
        for _ in range(3):
            evaluator(maps, images, labels)
        counts[fused] = (text.calls, image.calls)
    assert counts[True] == (2, 3)  # class + background prompts once per run; one batched image pass per step
    assert counts[False] == (9, 9)  # per step: OTM text, BTM text, background text; fg, bg, fg again


def test_new_prompts_drop_the_cache():
    evaluator = _evaluator(True)
    images, labels = _batch()
    maps = torch.rand(3, len(CLASSES), 4, 4)
    evaluator.set_prompts(_bank().class_prompts(), [])
    first = evaluator(maps, images, labels, with_background=False).s_fg
    evaluator.set_prompts(_bank().class_prompts()[::-1], [])
    second = evaluator(maps, images, labels, with_background=False).s_fg
    assert evaluator.class_text.shape == (len(CLASSES), 32)
    assert not torch.allclose(first, second)


def test_only_positive_maps_are_upsampled():
    """docs/reference.md#q15-per-step-python-loops: the fused path resizes K maps (not N×C) and N images, each once."""
    shapes = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.interpolate:
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    evaluator = _evaluator(True)
    evaluator.set_prompts(_bank().class_prompts(), _bank().background_prompts())
    images, labels = _batch()
    with Record():
        evaluator(torch.rand(3, len(CLASSES), 4, 4), images, labels)
    assert shapes == [(6, 1, 4, 4), (3, 3, 64, 64)]


def test_stays_in_eval_mode_and_frozen():
    evaluator = _evaluator(True)
    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), evaluator)
    parent.train()
    assert not evaluator.training and not any(m.training for m in evaluator.modules())
    assert not any(p.requires_grad for p in evaluator.parameters())
    assert parent[0].training


def test_weights_from_a_state_dict_file(tmp_path):
    """An OpenAI-CLIP-keyed state dict (open_clip's CLIP uses the same keys), DataParallel-prefixed."""
    source = _evaluator(True)
    torch.nn.init.normal_(source.clip.text_projection)
    state = {f"module.{k}": v for k, v in source.clip.state_dict().items()}
    assert "visual.conv1.weight" in source.clip.state_dict() and "token_embedding.weight" in source.clip.state_dict()
    path = tmp_path / "tiny_clip.pt"
    torch.save(state, path)
    torch.manual_seed(123)
    loaded = ClipEvaluator(TINY, pretrained=str(path), precision="fp32")
    for (name, a), b in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_clip_normalisation_mode():
    evaluator = _evaluator(True, normalize="clip")
    x = torch.zeros(1, 3, 2, 2)  # ImageNet mean colour
    mean = torch.tensor([0.485, 0.456, 0.406])
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = ((mean - clip_mean) / clip_std).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(evaluator._clip_pixels(x), expected)
    # reference mode: pixels untouched (docs/reference.md#q3-clip-input-pixels)
    assert torch.equal(_evaluator(True)._clip_pixels(x), x)


def test_bf16_close_to_fp32():
    images, labels = _batch()
    maps = torch.rand(3, len(CLASSES), 4, 4)
    scores = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        evaluator = ClipEvaluator(TINY, pretrained=None, precision=precision)
        evaluator.set_prompts(_bank().class_prompts(), _bank().background_prompts())
        scores[precision] = evaluator(maps, images, labels).s_fg
    assert scores["bf16"].dtype == torch.bfloat16
    torch.testing.assert_close(scores["bf16"].float(), scores["fp32"], rtol=0, atol=0.03)


def test_no_positive_pairs():
    evaluator = _evaluator(True)
    objective = ClimsObjective(evaluator)
    objective.set_prompt_bank(_bank())
    maps = torch.rand(2, len(CLASSES), 4, 4, requires_grad=True)
    out = objective(maps, torch.zeros(2, 3, 64, 64), torch.zeros(2, len(CLASSES)))
    assert out["otm"].item() == out["btm"].item() == out["cbs"].item() == 0
    torch.testing.assert_close(out["total"], 0.2 * maps.mean())


def test_weight_loading_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"quick_gelu.*use clip.model=ViT-B-32-quickgelu"):
        ClipEvaluator("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match=r"not a tag of clims-tiny-vit"):
        ClipEvaluator(TINY, pretrained="no_such_tag")
    with pytest.raises(ValueError, match=r"unknown open_clip architecture"):
        ClipEvaluator("ViT-Z-99", pretrained=None)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE=1.*clip.pretrained=/path"):
        ClipEvaluator("ViT-B-32-quickgelu", pretrained="openai", cache_dir=str(tmp_path))


def test_clip_input_size_reads_vit_pairs_and_resnet_ints() -> None:
    """open_clip stores a ViT's image_size as a pair and a ModifiedResNet's as an int; both must work."""
    register_tiny_configs()
    vit = open_clip.create_model("clims-toy-vit", pretrained=None)
    resnet = open_clip.create_model("clims-toy-rn", pretrained=None)
    assert isinstance(resnet.visual.image_size, int)
    assert clip_input_size(vit) == 128 and clip_input_size(resnet) == 64


def _torchscript_archive(source: torch.nn.Module, path) -> None:
    """An archive laid out like OpenAI's ViT-B-32.pt: the traced CLIP itself, fp16 tensors, metadata integers."""
    scripted = copy.deepcopy(source).half().float()  # OpenAI ships fp16; keep tracing in fp32 on the CPU
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        scripted.__dict__.pop(name, None)  # open_clip keeps some as plain attributes
        scripted.register_buffer(name, torch.tensor(value))
    size = clip_input_size(source)
    traced = torch.jit.trace_module(scripted, {"encode_image": torch.zeros(1, 3, size, size)})
    traced.half().save(str(path))


def test_weights_from_an_openai_torchscript_archive(tmp_path):
    """clip.pretrained=ViT-B-32.pt as OpenAI's package downloads it: TorchScript, fp16, with metadata buffers."""
    from clims_pl.models.clip_weights import is_torchscript

    source = _evaluator(True)
    torch.nn.init.normal_(source.clip.text_projection)
    path = tmp_path / "ViT-B-32.pt"
    _torchscript_archive(source.clip, path)
    plain = tmp_path / "plain.pt"
    torch.save(source.clip.state_dict(), plain)
    assert is_torchscript(path) and not is_torchscript(plain)
    torch.manual_seed(123)
    loaded = ClipEvaluator(TINY, pretrained=str(path), precision="fp32")
    for (name, a), b in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a.half().float(), msg=name)  # exactly the archive's fp16 values
    assert b.dtype == torch.float32


def test_foreign_weights_files_are_one_line_naming_the_file(tmp_path):
    from clims_pl.models.checkpoint import CheckpointError

    resnet = tmp_path / "resnet.pt"
    torch.save(CAMNet("resnet18", num_classes=4, pretrained=False).state_dict(), resnet)
    with pytest.raises(CheckpointError, match=r"^clip.pretrained=.*resnet.pt: not weights of clip.model=clims-tiny"):
        ClipEvaluator(TINY, pretrained=str(resnet), precision="fp32")
    other = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    other.save(str(tmp_path / "linear.pt"))
    with pytest.raises(CheckpointError, match=r"linear.pt: this TorchScript archive does not hold weights of clip"):
        ClipEvaluator(TINY, pretrained=str(tmp_path / "linear.pt"), precision="fp32")
