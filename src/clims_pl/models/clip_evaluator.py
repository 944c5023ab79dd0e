"""Frozen CLIP (open_clip) as the CLIMS teacher: similarities of masked images to class and background prompts.

What one training step needs from CLIP (docs/reference.md#clims-training-step, steps 3–8): for every positive (image n, class c) pair,
the cosine similarity of the foreground crop ``cam ⊙ img`` and of the background crop ``(1 − cam) ⊙ img`` to the
class prompt, and of the foreground crop to each background prompt (L_CBS).

Two orders of work give the same numbers:

* ``fused=True`` (default): CLIP frozen (``requires_grad_(False)``, docs/reference.md#q2-clip-not-frozen), text embeddings encoded once and cached
  (docs/reference.md#q14-repeated-clip-work a/b), only the K positive maps upsampled (docs/reference.md#q15-per-step-python-loops), fg and bg crops encoded in ONE batched pass whose fg
  features are reused for CBS (docs/reference.md#q14-repeated-clip-work c): 2K image encodes and no text encode per step.
* ``fused=False``: the reference's order, kept to prove equality and to benchmark against: all N×C maps upsampled,
  crops stacked in a Python loop, prompts re-tokenised and re-encoded for OTM and again for BTM, background prompts
  encoded every step, fg crops encoded twice (3K image encodes), CLIP parameter gradients on.

Pixels (docs/reference.md#q3-clip-input-pixels, [FAITHFUL]): ``normalize="reference"`` feeds CLIP the ImageNet-normalised training pixels, masked in
that space (masked pixels become the ImageNet mean colour), as the official code does; ``normalize="clip"``
re-normalises with CLIP's mean/std first (masked pixels become CLIP's mean colour), as the camera-ready code did.
Images and maps are resized to the CLIP input size with align-corners bilinear and no antialiasing, as reference.

Precision: ``fp16`` is the reference (OpenAI CLIP on CUDA runs in half precision; LayerNorms upcast inside).
``auto`` = fp16 when CUDA is available when the evaluator is built, else fp32, because half-precision GEMMs on
CPU are slow or unsupported; ``bf16`` is the fast CPU option (AMX/AVX512-bf16). The evaluator runs outside any
autocast region of the trainer, so ``clip.precision`` alone decides CLIP's arithmetic.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from clims_pl.models.clip_weights import create_clip

#: Tiny registered architectures for tests and the toy world (``clims-tiny-vit``); registered on construction.
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
Precision = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ClipScores:
    """Cosine similarities for the K positive pairs, in row-major (image, class) order.

    Attributes:
        s_fg: (K,) foreground crop vs class prompt.
        s_bg: (K,) background crop vs the same class prompt.
        s_fg_bg: (K, B) foreground crop vs each background prompt; None when not requested.
        n_idx, c_idx: (K,) image and class index of each pair.
    """

    s_fg: torch.Tensor
    s_bg: torch.Tensor
    s_fg_bg: torch.Tensor | None
    n_idx: torch.Tensor
    c_idx: torch.Tensor


class ClipEvaluator(nn.Module):
    """Frozen open_clip model that scores masked images against cached prompt embeddings.

    Args:
        model: open_clip architecture. The reference ViT-B/32 is ``ViT-B-32-quickgelu``: OpenAI's weights use
            QuickGELU, and plain ``ViT-B-32`` + ``openai`` silently runs the wrong activation (we refuse it).
        pretrained: an open_clip tag (``openai``), a local weights file (OpenAI's TorchScript archive, or a state
            dict with open_clip or OpenAI CLIP keys, optionally ``module.``-prefixed), or None for random init (tests, benchmarks, toy).
        precision: ``fp16`` (reference), ``bf16``, ``fp32`` or ``auto`` (see module docstring).
        normalize: ``reference`` (ImageNet-normalised pixels, docs/reference.md#q3-clip-input-pixels) or ``clip`` (re-normalised with CLIP mean/std).
        input_size: CLIP input side; None = the model's (224 for ViT-B/32).
        fused: False = the reference's order of work with CLIP gradients on (benchmark/equality only).
        cache_dir: Hugging Face hub cache for tagged weights (default: HF_HOME's).
    """

    def __init__(
        self,
        model: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        precision: Precision = "auto",
        normalize: Literal["reference", "clip"] = "reference",
        input_size: int | None = None,
        fused: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        register_tiny_configs()
        if model not in open_clip.list_models():
            raise ValueError(f"clip.model={model!r}: unknown open_clip architecture (see open_clip.list_models())")
        if normalize not in ("reference", "clip"):
            raise ValueError(f"clip.normalize must be 'reference' or 'clip', got {normalize!r}")
        self.precision = resolve_precision(precision)
        self.dtype = clip_dtype(self.precision)
        self.model_name = model
        weights = _resolve_pretrained(model, pretrained, cache_dir)
        self.clip = create_clip(model, weights, self.precision)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.input_size = int(input_size or clip_input_size(self.clip))
        self.fused = fused
        # docs/reference.md#q2-clip-not-frozen: the reference never freezes CLIP; frozen weights give identical input gradients, so only the naive
        # path keeps the (useless, accumulating) parameter gradients, to reproduce its cost.
        self.clip.requires_grad_(not fused)
        scale, shift = _pixel_affine(normalize, model, pretrained)
        self.normalize = normalize
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)
        self.class_prompts: list[list[str]] = []
        self.background_prompts: list[list[str]] = []
        # Text embeddings (normalised), encoded on first use on the module's device, then reused every step.
        self.register_buffer("class_text", torch.empty(0), persistent=False)
        self.register_buffer("background_text", torch.empty(0), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> ClipEvaluator:
        """Always eval mode: CLIP is a fixed teacher (reference ``clip_model.eval()``), whatever the parent does."""
        return super().train(False)

    def set_prompts(self, class_prompts: list[list[str]], background_prompts: list[list[str]]) -> None:
        """Prompts per class (C × T strings) and per background concept (B × T); drops any cached embeddings."""
        self.class_prompts = [list(p) for p in class_prompts]
        self.background_prompts = [list(p) for p in background_prompts]
        self.class_text = torch.empty(0, device=self.pixel_scale.device)
        self.background_text = torch.empty(0, device=self.pixel_scale.device)

    def forward(
        self, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *, with_background: bool = True
    ) -> ClipScores:
        """Score the K positive pairs of ``labels`` (N, C) using ``maps`` (N, C, h, w) in [0, 1] on ``images``.

        ``images`` are the training-normalised (N, 3, H, W) crops. ``with_background`` adds the (K, B) scores
        against the background prompts for L_CBS.
        """
        if not self.class_prompts:
            raise RuntimeError("ClipEvaluator: call set_prompts(...) first (ClimsModule does it in setup())")
        if with_background and not self.background_prompts:
            raise RuntimeError("ClipEvaluator: background scores requested but the prompt bank has no background")
        n_idx, c_idx = (labels > 0.5).nonzero(as_tuple=True)
        if len(n_idx) == 0:
            empty = maps.new_zeros(0)
            s_fg_bg = maps.new_zeros(0, len(self.background_prompts)) if with_background else None
            return ClipScores(empty, empty, s_fg_bg, n_idx, c_idx)
        with torch.autocast(device_type=maps.device.type, enabled=False):
            if self.fused:
                return self._fused(maps, images, n_idx, c_idx, with_background)
            return self._naive(maps, images, n_idx, c_idx, with_background)

    def _fused(self, maps, images, n_idx, c_idx, with_background) -> ClipScores:
        self._cache_text()
        size = (self.input_size, self.input_size)
        cams = F.interpolate(maps[n_idx, c_idx].unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        imgs = self._clip_pixels(F.interpolate(images, size=size, mode="bilinear", align_corners=True))[n_idx]
        feats = self._encode_images(torch.cat([cams * imgs, (1 - cams) * imgs]))
        f_fg, f_bg = feats.split(len(n_idx))
        text = self.class_text[c_idx]
        s_fg_bg = f_fg @ self.background_text.T if with_background else None
        return ClipScores(_cosine(f_fg, text), _cosine(f_bg, text), s_fg_bg, n_idx, c_idx)

    def _naive(self, maps, images, n_idx, c_idx, with_background) -> ClipScores:
        n, c = maps.shape[:2]
        size = (self.input_size, self.input_size)
        cams = F.interpolate(maps, size=size, mode="bilinear", align_corners=True).reshape(n * c, 1, *size)
        imgs = self._clip_pixels(F.interpolate(images, size=size, mode="bilinear", align_corners=True))
        pairs = list(zip(n_idx.tolist(), c_idx.tolist(), strict=True))
        fg = torch.stack([cams[i * c + j] * imgs[i] for i, j in pairs])
        bg = torch.stack([(1 - cams[i * c + j]) * imgs[i] for i, j in pairs])
        pair_prompts = [self.class_prompts[j] for _, j in pairs]
        s_fg = _cosine(self._encode_images(fg), self._encode_texts(pair_prompts))
        s_bg = _cosine(self._encode_images(bg), self._encode_texts(pair_prompts))
        s_fg_bg = None
        if with_background:
            s_fg_bg = self._encode_images(fg) @ self._encode_texts(self.background_prompts).T
        return ClipScores(s_fg, s_bg, s_fg_bg, n_idx, c_idx)

    def _cache_text(self) -> None:
        """Encode the class and background prompts once (CLIP is frozen and in eval mode, so they are constant)."""
        if self.class_text.numel():
            return
        with torch.no_grad():
            self.class_text = self._encode_texts(self.class_prompts)
            if self.background_prompts:
                self.background_text = self._encode_texts(self.background_prompts)

    def _clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize == "reference":
            return images
        return images * self.pixel_scale + self.pixel_shift

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images.to(self.dtype)), dim=-1)

    def _encode_texts(self, prompts: list[list[str]]) -> torch.Tensor:
        """(M, D) normalised embeddings of M prompt groups; a group's templates are averaged, then re-normalised."""
        per_group = len(prompts[0])
        tokens = self.tokenizer([p for group in prompts for p in group]).to(self.pixel_scale.device)
        feats = F.normalize(self.clip.encode_text(tokens), dim=-1)
        if per_group == 1:
            return feats
        return F.normalize(feats.view(len(prompts), per_group, -1).mean(dim=1), dim=-1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of unit vectors as a batched (1×D)·(D×1) matmul, like the reference; no logit scale."""
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(2)).flatten()


def clip_input_size(clip: torch.nn.Module) -> int:
    """Image side a CLIP model expects: open_clip's ViTs store ``image_size`` as a pair, its ResNets as an int."""
    size = clip.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def register_tiny_configs() -> None:
    """Register our tiny architectures with open_clip (per process, so DDP workers and subprocesses see them)."""
    known = set(open_clip.list_models())
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.stem not in known:
            open_clip.add_model_config(path)


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """The precision an evaluator built for ``device_type`` (default: cuda if available, else cpu) runs CLIP in.

    A function of its own so that the CUDA choice (fp16 for ``auto``) is checkable, and printable by the
    preflight, on a machine without a GPU.
    """
    if precision == "auto":
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        return "fp16" if device_type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"clip.precision must be one of auto, fp32, fp16, bf16; got {precision!r}")
    return precision


def clip_dtype(precision: str, device_type: str | None = None) -> torch.dtype:
    """torch dtype of CLIP's weights and image inputs for ``precision`` on ``device_type`` (see resolve_precision)."""
    return _DTYPES[resolve_precision(precision, device_type)]


def _pixel_affine(normalize: str, model: str, pretrained: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel a, b with clip_pixels = a·x + b mapping ImageNet-normalised x to CLIP-normalised pixels."""
    if normalize == "reference":
        return torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    from clims_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    tag = open_clip.get_pretrained_cfg(model, str(pretrained)) if pretrained else {}
    clip_mean = torch.tensor(tag.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32)
    clip_std = torch.tensor(tag.get("std", OPENAI_DATASET_STD), dtype=torch.float32)
    in_mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
    in_std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
    scale, shift = in_std / clip_std, (in_mean - clip_mean) / clip_std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def _resolve_pretrained(model: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """A local weights file for ``pretrained`` (file as is; tag → HF cache, downloading only when online)."""
    if pretrained in (None, "", "none", "null"):
        return None
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return str(path)
    tag = open_clip.get_pretrained_cfg(model, str(pretrained))
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"clip.pretrained={pretrained!r}: no such file, and not a tag of {model} (tags: {tags})")
    model_gelu = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    if bool(tag.get("quick_gelu", False)) != model_gelu:
        fix = f"{model}-quickgelu" if tag.get("quick_gelu") else model.removesuffix("-quickgelu")
        raise ValueError(
            f"clip.model={model} with clip.pretrained={pretrained}: the weights were trained with "
            f"quick_gelu={tag.get('quick_gelu', False)} but the architecture uses quick_gelu={model_gelu}; "
            f"use clip.model={fix}"
        )
    cached = cached_hub_file(tag, cache_dir)
    if cached:
        return cached
    message = (
        f"clip.model={model} clip.pretrained={pretrained}: weights not in the Hugging Face cache and cannot be "
        'downloaded (offline?). Pre-download where there is internet: python -c "import open_clip; '
        f"open_clip.create_model('{model}', pretrained='{pretrained}')\", copy the HF cache here (HF_HOME, or "
        "clip.cache_dir) and set HF_HUB_OFFLINE=1; or pass clip.pretrained=/path/to/weights.pt"
    )
    if not _online(tag):
        raise RuntimeError(message)
    try:
        return open_clip.download_pretrained(tag, cache_dir=cache_dir)
    except Exception as err:
        raise RuntimeError(message) from err


def cached_hub_file(tag: dict, cache_dir: str | None) -> str | None:
    """Path of the tag's weights in the HF hub cache (safetensors or bin, as open_clip names them), else None."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(tag.get("hf_hub", ""))
    if not repo:
        return None
    for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(hit, str):
            return hit
    return None


def _online(tag: dict) -> bool:
    """Quick reachability probe, so an offline run fails in seconds rather than after the hub's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT if tag.get("hf_hub") else tag.get("url", "")).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True
