"""The self-trained toy CLIP (clims-toyclip): loss values, cache, determinism, loading, no dataset reads."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from clims_pl.models.clip_evaluator import register_tiny_configs
from clims_pl.stages.toyclip import run
from clims_pl.toyclip import (
    _sampler,
    ensure_toyclip,
    evidence,
    multi_positive_loss,
    range_loss,
    to_clip_size,
    toy_concepts,
)

#: A CI-sized run: a few steps on tiny batches, a tiny buffer and a tiny evaluation.
TINY = [
    "train.steps=3",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.num_threads=null",
    "train.log_every=1",
    "train.pool.per_class=2",
    "train.pool.per_background=1",
    "train.pool.refresh_per_step=1",
    "train.pool.buffer_size=16",
    "train.pool.fresh_per_step=4",
    "eval.per_kind=2",
    "eval.scenes=4",
]


def test_multi_positive_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    ev = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # image→concepts: only row 0 has evidence; target (½, 0, ½) over softmax of (2, 0, 1); KL = CE − log 2.
    lse = math.log(math.e**2 + 1 + math.e)
    i2t = 0.5 * (lse - 2) + 0.5 * (lse - 1) - math.log(2)
    # concepts→images: concepts 0 and 2 have evidence (image 0 only, entropy 0); concept 1 none, skipped.
    t2i = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)))
    assert float(multi_positive_loss(logits, ev)) == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    # Duplicate positives are not negatives: two identical images with the same caption, perfect logits.
    same = multi_positive_loss(torch.tensor([[10.0, -10.0], [10.0, -10.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # t2i target (½, ½) met exactly: not penalised


def test_range_loss_and_evidence_by_hand() -> None:
    cos = torch.tensor([[0.4, 0.2]])
    ev = torch.tensor([[1.0, 0.0]])
    assert float(range_loss(cos, ev, [0.1, 0.4])) == pytest.approx((0.0**2 + 0.1**2) / 2)
    # 4×4 image: concept 0 covers 2 cells, concept 1 covers 8 cells; the map shows the left half.
    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 0, 0, 0:2] = 1
    regions[0, 1, 2:4, :] = 1
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., :2] = 1
    # a_min = 1/16 (1 cell), a_sat = 4/16 (4 cells): concept 0 → 2/2; concept 1 → 4 visible / min(8, 4) = 1.
    assert evidence(regions, maps, [1 / 16, 4 / 16]).tolist() == [[1.0, 1.0]]
    assert evidence(regions, maps * 0.5, [1 / 16, 0.75]).tolist() == [[0.5, 0.25]]


def test_captions_never_read_files(compose_cfg, monkeypatch) -> None:
    """Images and captions come from the renderer alone: any file read while sampling is an error."""
    cfg = compose_cfg("toyclip", TINY)
    concepts = toy_concepts(cfg.prompts)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"caption generation read a file: {args[:1]}")

    for owner, name in [(builtins, "open"), (PIL.Image, "open"), (np, "load"), (Path, "open"), (torch, "load")]:
        monkeypatch.setattr(owner, name, forbidden)
    sampler = _sampler(cfg, concepts, clip_size=64)
    x, ev = sampler.batch(8)
    assert x.shape == (8, 3, 64, 64) and ev.shape == (8, len(concepts.names))
    assert float(ev.min()) >= 0.0 and float(ev.max()) <= 1.0
    assert not Path(cfg.paths.data_dir).exists()


def test_ci_run_checkpoint_cache_determinism_and_clip_config(compose_cfg, tmp_path, monkeypatch) -> None:
    cfg = compose_cfg("toyclip", TINY)
    first = run(cfg)
    ckpt = Path(cfg.checkpoint)
    assert first["training"]["trained"] is True and ckpt.is_file()
    assert Path(cfg.metrics).is_file() and (Path(cfg.paths.output_dir) / "toyclip_metrics.json").is_file()
    for key in ("object_alone_acc", "scene_object_acc", "background_acc"):
        assert 0.0 <= first[key] <= 1.0

    # The real users' path: open_clip's pretrained=<file> loader, strict.
    register_tiny_configs()
    loaded = open_clip.create_model(cfg.arch, pretrained=str(ckpt)).eval()  # BN towers: running statistics
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    # Cache hit: no training, file untouched, and the stored metrics of this checkpoint are reused (no eval).
    mtime = ckpt.stat().st_mtime_ns
    monkeypatch.setattr("clims_pl.stages.toyclip.evaluate_toyclip", lambda *a: pytest.fail("re-evaluated a cache hit"))
    second = run(cfg)
    assert second["training"]["trained"] is False and ckpt.stat().st_mtime_ns == mtime
    assert second["object_alone_acc"] == first["object_alone_acc"]
    # Another eval config on the same checkpoint is evaluated again.
    monkeypatch.undo()
    reeval = run(compose_cfg("toyclip", [*TINY, "eval.seed=7"]))
    assert reeval["training"]["trained"] is False and reeval["eval_config"]["seed"] == 7
    # A changed training key misses the cache.
    changed = compose_cfg("toyclip", [*TINY, "train.lr=1e-3", f"checkpoint={tmp_path}/other.pt"])
    assert ensure_toyclip(changed)["config_hash"] != second["training"]["config_hash"]

    # Same seed, another file → identical weights.
    again = compose_cfg("toyclip", [*TINY, f"checkpoint={tmp_path}/again.pt"])
    assert ensure_toyclip(again)["trained"] is True
    other = torch.load(tmp_path / "again.pt", weights_only=True)
    assert saved.keys() == other.keys() and all(torch.equal(saved[k], other[k]) for k in saved)

    # conf/clip/toyclip.yaml points the CLIMS evaluator at this file (seed 0), with the training preprocessing.
    clip_cfg = compose_cfg("train", ["experiment=toy_clims", "clip=toyclip"]).clip
    assert clip_cfg.pretrained == cfg.checkpoint and clip_cfg.normalize == "reference"
    evaluator = instantiate(clip_cfg)
    concepts = toy_concepts(cfg.prompts)
    evaluator.set_prompts(concepts.bank.class_prompts(), concepts.bank.background_prompts())
    gen = torch.Generator().manual_seed(0)
    images, maps = torch.randn(2, 3, 128, 128, generator=gen), torch.rand(2, 4, 8, 8, generator=gen)
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    scores = evaluator(maps, images, labels)
    # The teacher was trained on to_clip_size(map) * to_clip_size(image): the evaluator scores exactly that.
    size = evaluator.input_size
    fg = to_clip_size(maps[[0, 1], [0, 2]].unsqueeze(1), size) * to_clip_size(images, size)
    with torch.no_grad():
        feats = F.normalize(loaded.encode_image(fg), dim=-1)
        text = F.normalize(
            loaded.encode_text(open_clip.get_tokenizer(cfg.arch)(["a photo of aeroplane.", "a photo of cow."])),
            dim=-1,
        )
    assert torch.allclose(scores.s_fg, (feats * text).sum(-1), atol=1e-5)
