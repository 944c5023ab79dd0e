"""CLIP weights from a local file: OpenAI's TorchScript archives (the ``ViT-B-32.pt`` that OpenAI's ``clip`` package
downloads, which the reference loads with ``clip.load``) as well as plain state dicts with OpenAI or open_clip keys.

open_clip reads plain files with ``torch.load(weights_only=True)``, which refuses TorchScript archives; those are
opened with ``torch.jit.load`` on the CPU (TorchScript code, not Python pickles) and only their tensors are kept.
"""

from __future__ import annotations

import os
import zipfile

import open_clip
import torch
from torch import nn

from clims_pl.models.checkpoint import CheckpointError, load_error

#: Integers OpenAI's archives keep beside the weights (their ``build_model`` drops them too).
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
EXPECTED = (
    "expected OpenAI's TorchScript archive (e.g. ViT-B-32.pt) or a state dict with OpenAI or open_clip keys "
    "(visual.*, token_embedding.weight ...) of clip.model"
)


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive: a zip with ``code/`` and ``constants.pkl`` (``torch.save`` zips have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def torchscript_state(path: str | os.PathLike, key: str = "clip.pretrained") -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, under the module's own names, on the CPU, metadata dropped."""
    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as err:  # a damaged archive fails in many ways: name the file
        raise load_error(key, path, err) from err
    return {k: v for k, v in state.items() if k not in OPENAI_METADATA}


def create_clip(model: str, weights: str | None, precision: str, key: str = "clip.pretrained") -> nn.Module:
    """open_clip model ``model`` in ``precision`` with the weights of file ``weights`` (None: random init)."""
    if weights is None or not is_torchscript(weights):
        try:
            return open_clip.create_model(model, pretrained=weights, precision=precision)
        except Exception as err:  # a text, truncated, payload or foreign file fails in many ways: name the file
            if weights is None:
                raise
            if "loading state_dict" in str(err):
                raise CheckpointError(f"{key}={weights}: not weights of clip.model={model}; {EXPECTED}") from err
            raise load_error(key, weights, err) from err
    state = torchscript_state(weights, key)
    clip = open_clip.create_model(model, pretrained=None, precision=precision)
    # TorchScript saves every buffer, also those the module rebuilds itself (open_clip's non-persistent attn_mask).
    rebuilt = {name for name, _ in clip.named_buffers()} - set(clip.state_dict())
    state = {k: v for k, v in state.items() if k not in rebuilt}
    try:
        clip.load_state_dict(state)  # copies cast OpenAI's fp16 tensors to the model's precision
    except RuntimeError as err:
        raise CheckpointError(
            f"{key}={weights}: this TorchScript archive does not hold weights of clip.model={model} "
            f"(first key {next(iter(state), None)!r}); {EXPECTED}"
        ) from err
    return clip
