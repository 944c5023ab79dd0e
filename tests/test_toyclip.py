"""The self-trained toy CLIP (clims-toyclip = the train stage + export + zero-shot metrics): loss values, schedule,
export, determinism, resume, loading, no dataset reads."""

from __future__ import annotations

import builtins
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from clims_pl.data.toy_captions import evidence, to_clip_size, toy_concepts
from clims_pl.models.clip_evaluator import register_tiny_configs
from clims_pl.modules.toyclip import ToyClipModule, multi_positive_loss, range_loss
from clims_pl.stages.toyclip import run

#: A CI-sized run: a few steps on tiny batches, a tiny buffer and a tiny evaluation.
TINY = [
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "model.optim.warmup_steps=1",
    "toyclip.num_threads=null",
    "data.pool.per_class=2",
    "data.pool.per_background=1",
    "data.pool.refresh_per_step=1",
    "data.pool.buffer_size=16",
    "data.pool.fresh_per_step=4",
    "toyclip.eval.per_kind=2",
    "toyclip.eval.scenes=4",
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


def test_warmup_cosine_schedule_by_hand(compose_cfg) -> None:
    """torch's LinearLR + CosineAnnealingLR give (s + 1) / w during warm-up, then ½(1 + cos(π (s − w) / (T − w)))."""
    cfg = compose_cfg("toyclip", ["model.optim.warmup_steps=3"])
    module: ToyClipModule = instantiate(cfg.model, _convert_="all")
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decay, other = opt.param_groups
    assert (decay["weight_decay"], other["weight_decay"]) == (0.05, 0.0)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in other["params"])
    assert not any(p is module.model.token_embedding.weight for p in decay["params"])
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [(s + 1) / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(10)]
    assert lrs == pytest.approx([2e-3 * f for f in expected], rel=1e-6, abs=1e-12)


def test_captions_never_read_files(compose_cfg, monkeypatch) -> None:
    """Images and captions come from the renderer alone: any file read while sampling is an error."""
    cfg = compose_cfg("toyclip", TINY)
    datamodule = instantiate(cfg.data)  # reads the prompt bank and the tiny model configs, then no file again
    assert datamodule.clip_size == 64

    def forbidden(*args, **kwargs):
        raise AssertionError(f"caption generation read a file: {args[:1]}")

    for owner, name in [(builtins, "open"), (PIL.Image, "open"), (np, "load"), (Path, "open"), (torch, "load")]:
        monkeypatch.setattr(owner, name, forbidden)
    x, ev = datamodule.sampler().batch(8)
    assert x.shape == (8, 3, 64, 64) and ev.shape == (8, len(datamodule.concepts.names))
    assert float(ev.min()) >= 0.0 and float(ev.max()) <= 1.0
    assert not Path(cfg.paths.data_dir).exists()
    # Deterministic per seed; a resumed run's stream (start_step > 0) is another one.
    again, _ = datamodule.sampler().batch(8)
    resumed, _ = datamodule.sampler(start_step=2).batch(8)
    assert torch.equal(x, again) and not torch.equal(x, resumed)


def test_ci_run_export_determinism_and_clip_config(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg("toyclip", TINY)
    first = run(cfg)
    out = Path(cfg.paths.output_dir)
    ckpt = Path(cfg.toyclip.export)
    assert ckpt == out / "toyclip.pt" and ckpt.is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "metrics" / "toyclip.json").is_file() and first["training"]["global_step"] == 3
    assert "train/contrastive" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    for key in ("object_alone_acc", "scene_object_acc", "background_acc"):
        assert 0.0 <= first[key] <= 1.0

    # The real users' path: open_clip's pretrained=<file> loader, strict.
    register_tiny_configs()
    loaded = open_clip.create_model(cfg.model.arch, pretrained=str(ckpt)).eval()  # BN towers: running statistics
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    # Same seed, another run folder → identical weights.
    run(compose_cfg("toyclip", [*TINY, f"paths.output_dir={tmp_path}/again"]))
    other = torch.load(tmp_path / "again" / "toyclip.pt", weights_only=True)
    assert saved.keys() == other.keys() and all(torch.equal(saved[k], other[k]) for k in saved)

    # conf/clip/toyclip.yaml reads the file the shared toyclip stage of toy_demo and toy_ablation exports.
    for experiment in ("toy_demo", "toy_ablation"):
        composed = compose_cfg("reproduce", [f"experiment={experiment}", f"run_dir={tmp_path}/r"])
        stage = composed.pipeline.stages.toyclip
        assert Path(stage.dir) == Path(cfg.paths.cache_dir) / "toyclip" / "clims-toy-rn-seed0"
        assert list(stage.outputs) == ["toyclip.pt"]
    # conf/clip/toyclip.yaml points the CLIMS evaluator at this file (seed 0), with the training preprocessing.
    clip_cfg = compose_cfg("train", ["experiment=toy_clims", "clip=toyclip"]).clip
    assert clip_cfg.pretrained == f"{stage.dir}/toyclip.pt" and clip_cfg.normalize == "reference"
    clip_cfg.pretrained = str(ckpt)
    evaluator = instantiate(clip_cfg)
    concepts = toy_concepts(cfg.model.prompts)
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
            loaded.encode_text(open_clip.get_tokenizer(cfg.model.arch)(["a photo of aeroplane.", "a photo of cow."])),
            dim=-1,
        )
    assert torch.allclose(scores.s_fg, (feats * text).sum(-1), atol=1e-5)


def test_killed_run_resumes_to_the_same_global_step(compose_cfg) -> None:
    common = [*TINY, "trainer.max_steps=4", "toyclip.eval.per_kind=1", "toyclip.eval.scenes=1"]
    killer = ["+callbacks.kill._target_=test_train.KillAt", "+callbacks.kill.step=2"]
    with pytest.raises(RuntimeError, match="killed at step 2"):
        run(compose_cfg("toyclip", [*common, *killer]))
    cfg = compose_cfg("toyclip", [*common, "ckpt_path=last"])
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2 and not Path(cfg.toyclip.export).exists()
    resumed = run(cfg)
    assert resumed["training"]["global_step"] == 4 and Path(cfg.toyclip.export).is_file()
    # The cosine schedule continued from step 2 to its end (lr 0 after the last step), not restarted.
    assert resumed["training"]["lr_final"] == pytest.approx(0.0, abs=1e-12)
