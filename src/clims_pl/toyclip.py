"""`clims-toyclip`: train the tiny CLIP that plays the CLIMS teacher in the offline toy world.

No real CLIP can be downloaded here, so the toy world (:mod:`clims_pl.data.toy`) gets its own: an open_clip
model of the registered architecture ``clims-toy-vit`` (models/clip_configs), trained contrastively on images
rendered on the fly by :class:`~clims_pl.data.toy.ToyWorld` and scored against the toy prompt bank's concept
prompts ("a photo of boat.", "a photo of water."). Nothing is read from the generated dataset (images, masks,
annotations): every image and its caption come from the renderer, so the teacher never sees the labels CLIMS
is evaluated on. The result is a plain open_clip state dict that loads through the same
``open_clip.create_model(name, pretrained=<file>)`` path as a real CLIP checkpoint (``conf/clip/toyclip.yaml``).

**What CLIMS asks of its teacher (docs/reference.md#clims-training-step)**, hence how the pairs are made. CLIP scores
``P ⊙ img`` and ``(1 − P) ⊙ img`` (ImageNet-normalised pixels, masked pixels → 0 = the mean colour, bilinear
align-corners resize to the CLIP input) against class prompts (OTM, BTM) and background prompts (CBS). So the
teacher is trained on exactly such inputs: each image goes through the CLIMS training augmentation
(``train_transform``: random long-side resize, ImageNet normalisation, flip, padded crop), then a random
CAM-like soft map at stride 16 (none, random blobs, a noisy blob around one concept's region, or the
complement of either) is upsampled and multiplied in normalised space, exactly as ``ClipEvaluator`` does.

**Captions as evidence.** An image shows objects alone (on the mean-colour canvas, as a perfect foreground crop
does), backgrounds alone (one texture or two bands), or composites of 1–2 objects on backgrounds; objects and
backgrounds are drawn independently, so unlike the dataset a boat is no likelier on water than on grass and
the teacher cannot learn the co-occurrence it must help remove. Its caption is a soft multi-hot *evidence*
vector over the concepts (classes then named backgrounds): e_k = visible (mask-weighted) area of concept k
divided by its area clamped to ``evidence_area`` = [a_min, a_sat] of the image. An object half hidden by the
mask scores 0.5, a background is fully "there" once a_sat of the image shows it, unnamed textures (wall, sand)
and the canvas count for nothing.

**Loss.** With a handful of distinct captions, open_clip's ClipLoss would treat every duplicate caption in
a batch as a negative. :func:`multi_positive_loss` is the symmetric CLIP loss with soft targets instead:
image→concepts cross-entropy against the row-normalised evidence, plus concepts→images cross-entropy
against the column-normalised evidence. :func:`range_loss` pulls each cosine towards
``lo + (hi − lo)·e`` (default [0.1, 0.4]): contrastive training alone spreads cosines over [−1, 1], while real
CLIP similarities sit at ~0.15–0.35. The reference clamps OTM/BTM similarities at 1e-4 (negative cosines
silence their gradients) and thresholds CBS at 0.26, so the toy teacher is kept in that CLIP-like range.

**Speed.** Rendering a scene costs ~14 ms; objects and textures are rendered into a pool (a few re-rendered
every step), composed per sample, and the composed, augmented images are kept in a buffer that is partly
replaced every step, each image reused under new random maps (:class:`CaptionSampler`). The token embedding
(49408 × width) stays at its random initialisation: only ~10 distinct prompts exist, and AdamW over that table
would dominate the step time. ``clims-toy-rn`` (the default) reads the toy crop resized to 64 px, the size
at which a width-32 ModifiedResNet still sees the body patterns; ``clims-toy-vit`` reads the 128-px crop
unresized with 16-px patches (64 tokens).

**Why this tower.** ``clims-toy-rn`` at 64 px is the smallest tower that tells the toy classes apart within
CPU minutes; the towers tried and their accuracies are in docs/toy_world.md ("The toy CLIP").

The checkpoint is cached: an existing file whose sidecar ``<checkpoint>.json`` records the same config hash
is reused without training. Zero-shot accuracies and similarity ranges on held-out renders (another seed) are
measured through :class:`~clims_pl.models.clip_evaluator.ClipEvaluator`, i.e. the exact CLIMS scoring path.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clims_pl.data.toy import NEUTRAL_RGB, TOY_BACKGROUNDS, TOY_CLASSES, TOY_VERSION, ToyWorld
from clims_pl.data.transforms import imagenet_normalize, train_transform
from clims_pl.io import atomic_path, atomic_write_json
from clims_pl.models.clip_evaluator import CONFIG_DIR, ClipEvaluator, clip_input_size, register_tiny_configs
from clims_pl.prompts.bank import PromptBank, load_prompt_bank
from clims_pl.provenance import digest
from clims_pl.runtime import log

#: Concept-map code of a pixel that shows no concept (canvas, wall, sand); crop padding is 255 (IGNORE_INDEX).
NO_CONCEPT = 254
MASK_KINDS = ("none", "blob", "region")


# ----------------------------------------------------------------------------------------------- concepts
@dataclass(frozen=True)
class Concepts:
    """The prompts the teacher learns: the bank's classes (channel order), then its background words.

    ``world_class[i]`` / ``world_background[name]`` map renderer outputs to concept indices.
    """

    bank: PromptBank

    @property
    def prompts(self) -> list[list[str]]:
        return self.bank.class_prompts() + self.bank.background_prompts()

    @property
    def names(self) -> list[str]:
        return [*self.bank.classes, *self.bank.background]

    @property
    def num_classes(self) -> int:
        return len(self.bank.classes)

    def world_class(self, index: int) -> int:
        return self.bank.classes.index(TOY_CLASSES[index])

    def world_background(self, name: str) -> int:
        """Concept index of a texture, or NO_CONCEPT for textures without a prompt (wall, sand)."""
        if name in self.bank.background:
            return self.num_classes + self.bank.background.index(name)
        return NO_CONCEPT


def toy_concepts(prompts: str) -> Concepts:
    """Load the bank and check it speaks about the toy world (classes = TOY_CLASSES, backgrounds are textures)."""
    bank = load_prompt_bank(prompts, classes=TOY_CLASSES)
    unknown = [b for b in bank.background if b not in TOY_BACKGROUNDS]
    if unknown:
        raise ValueError(f"{bank.source}: background {unknown} are not toy textures {list(TOY_BACKGROUNDS)}")
    return Concepts(bank)


# ------------------------------------------------------------------------------------------ image making
class PrimitivePool:
    """Rendered objects (rgb, alpha) per class and textures per background, refreshed a few per step.

    WHY: composing a sample from pooled primitives is several times cheaper than rendering a scene, and
    re-rendering a few primitives every step keeps the stream changing.
    """

    def __init__(self, world: ToyWorld, per_class: int, per_background: int, rng: np.random.Generator) -> None:
        self.world = world
        self.objects = [[world.render_object(c, rng) for _ in range(per_class)] for c in TOY_CLASSES]
        self.textures = {b: [world.render_background(b, rng) for _ in range(per_background)] for b in TOY_BACKGROUNDS}

    def refresh(self, n: int, rng: np.random.Generator) -> None:
        """Re-render ``n`` random primitives (object or texture, equally likely)."""
        for _ in range(n):
            if rng.random() < 0.5:
                c = int(rng.integers(len(TOY_CLASSES)))
                self.objects[c][int(rng.integers(len(self.objects[c])))] = self.world.render_object(TOY_CLASSES[c], rng)
            else:
                name = TOY_BACKGROUNDS[int(rng.integers(len(TOY_BACKGROUNDS)))]
                slots = self.textures[name]
                slots[int(rng.integers(len(slots)))] = self.world.render_background(name, rng)


def _bands(pool: PrimitivePool, concepts: Concepts, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One texture, or two split by a wavy horizon: (rgb (S,S,3) uint8, concept map (S,S) uint8)."""
    names = [TOY_BACKGROUNDS[int(i)] for i in rng.choice(len(TOY_BACKGROUNDS), 1 + (rng.random() < 0.5), False)]
    layers = [pool.textures[n][int(rng.integers(len(pool.textures[n])))] for n in names]
    size = layers[0].shape[0]
    codes = np.full((size, size), concepts.world_background(names[0]), dtype=np.uint8)
    rgb = layers[0].copy()
    if len(names) == 2:
        x = np.arange(size)
        horizon = size * (
            rng.uniform(0.3, 0.7) + 0.06 * np.sin(2 * np.pi * (x / size * rng.uniform(0.5, 2) + rng.random()))
        )
        below = np.arange(size)[:, None] >= horizon[None, :]
        rgb[below] = layers[1][below]
        codes[below] = concepts.world_background(names[1])
    return rgb, codes


def _paste_object(
    rgb: np.ndarray,
    codes: np.ndarray,
    pool: PrimitivePool,
    concepts: Concepts,
    rng: np.random.Generator,
    hue_rotation: float,
) -> None:
    """Paste a pooled object of a random class, hue-rotated, at a random position inside the frame.

    WHY the hue rotation (uniform in ±``hue_rotation`` radians): pooled objects are reused, and a tiny model
    learns "this exact colour pair was a cow" long before it learns part shapes. The world draws hues
    uniformly, so a rotated object is an equally likely render, and memorising colours stops paying.
    """
    c = int(rng.integers(len(TOY_CLASSES)))
    obj_rgb, alpha = pool.objects[c][int(rng.integers(len(pool.objects[c])))]
    ys, xs = np.nonzero(alpha)
    size = alpha.shape[0]
    dy = int(rng.integers(-ys.min(), size - ys.max()))
    dx = int(rng.integers(-xs.min(), size - xs.max()))
    pixels = obj_rgb[ys, xs].astype(np.float32) @ _hue_rotation(float(rng.uniform(-1, 1)) * hue_rotation).T
    rgb[ys + dy, xs + dx] = np.clip(pixels, 0, 255).astype(np.uint8)
    codes[ys + dy, xs + dx] = concepts.world_class(c)


def _hue_rotation(angle: float) -> np.ndarray:
    """3×3 rotation of RGB about the grey axis (1, 1, 1): turns hue, keeps grey level and chroma."""
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(k, k)


def compose_sample(
    pool: PrimitivePool,
    concepts: Concepts,
    mix: Mapping[str, float],
    rng: np.random.Generator,
    hue_rotation: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An object alone, a background alone, or a composite; returns (rgb uint8, concept map uint8)."""
    kinds = list(mix)
    kind = kinds[int(rng.choice(len(kinds), p=_probabilities(mix)))]
    size = pool.world.size
    if kind == "object":
        rgb = np.empty((size, size, 3), dtype=np.uint8)
        rgb[:] = NEUTRAL_RGB
        codes = np.full((size, size), NO_CONCEPT, dtype=np.uint8)
        n_objects = 1
    elif kind in ("background", "composite"):
        rgb, codes = _bands(pool, concepts, rng)
        n_objects = 0 if kind == "background" else 1 + int(rng.random() < 0.4)
    else:
        raise ValueError(f"toyclip train.mix: unknown kind {kind!r}; use object, background, composite")
    for _ in range(n_objects):
        _paste_object(rgb, codes, pool, concepts, rng, hue_rotation)
    return rgb, codes


def _probabilities(weights: Mapping[str, float]) -> np.ndarray:
    p = np.asarray([float(v) for v in weights.values()])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"toyclip: mixture weights must be >= 0 with a positive sum, got {dict(weights)}")
    return p / p.sum()


def random_maps(regions: torch.Tensor, masks: Mapping[str, float], gen: torch.Generator) -> torch.Tensor:
    """CAM-like soft maps (B, 1, h, w) in [0, 1] at CAM resolution, one per image.

    ``regions`` (B, K, h, w) are the concepts' area fractions per CAM cell. Kinds (weights in ``masks``):
    none (all ones), blob (sigmoid of a random field), region (sigmoid of one present concept's region plus
    noise, with a random threshold: under- or over-covering like a CAM). ``masks.complement`` is the
    probability of using 1 − map instead (the background crop of CLIMS).
    """
    b, _, h, w = regions.shape
    p = torch.tensor(_probabilities({m: masks[m] for m in MASK_KINDS}), dtype=torch.float32)
    kind = torch.multinomial(p, b, replacement=True, generator=gen).view(b, 1, 1, 1)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    field = torch.randn(b, 1, h, w, generator=gen)
    blob = torch.sigmoid((1 + 5 * rand(b, 1, 1, 1)) * (field - (2 * rand(b, 1, 1, 1) - 1)))
    present = (regions.sum((2, 3)) > 0).float() + 1e-6
    pick = torch.multinomial(present, 1, generator=gen).view(b)
    region = regions[torch.arange(b), pick].unsqueeze(1) + 0.3 * rand(b, 1, 1, 1) * torch.randn(
        b, 1, h, w, generator=gen
    )
    region = torch.sigmoid((5 + 15 * rand(b, 1, 1, 1)) * (region - (0.05 + 0.55 * rand(b, 1, 1, 1))))
    maps = torch.where(kind == 0, torch.ones_like(blob), torch.where(kind == 1, blob, region))
    flip = (kind > 0) & (rand(b, 1, 1, 1) < float(masks["complement"]))
    return torch.where(flip, 1 - maps, maps)


def to_clip_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Align-corners bilinear resize, no antialiasing: what ClipEvaluator does to images and maps (docs/reference.md#clims-training-step, step 4).

    The teacher input is ``to_clip_size(map) * to_clip_size(image)`` (normalize=reference, docs/reference.md#clims-training-step, step 5).
    """
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def evidence(regions: torch.Tensor, maps: torch.Tensor, area: Sequence[float]) -> torch.Tensor:
    """(B, K) how much of each concept the masked image shows, in [0, 1].

    ``regions`` (B, K, s, s) concept area fractions and ``maps`` (B, 1, s, s) at the same resolution;
    e_k = Σ map·region_k / clamp(Σ region_k, a_min·s², a_sat·s²), capped at 1.
    """
    cells = regions.shape[-1] * regions.shape[-2]
    visible = (maps * regions).sum((2, 3))
    total = regions.sum((2, 3)).clamp(float(area[0]) * cells, float(area[1]) * cells)
    return (visible / total).clamp(max=1.0)


def concept_regions(codes: torch.Tensor, num_concepts: int, size: int) -> torch.Tensor:
    """(B, K, size, size) area fraction of each concept per cell, from (B, S, S) concept codes."""
    onehot = (codes.unsqueeze(1) == torch.arange(num_concepts, dtype=codes.dtype).view(1, -1, 1, 1)).float()
    return area_pool(onehot, size)


def area_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average over cells to ``size`` × ``size`` (a plain strided average when the side divides: faster)."""
    side = x.shape[-1]
    if side % size == 0 and x.shape[-2] == side:
        return F.avg_pool2d(x, side // size)
    return F.adaptive_avg_pool2d(x, size)


class CaptionSampler:
    """Endless batches of (masked teacher input, evidence) made on the fly from the renderer.

    A buffer holds ``buffer_size`` composed and augmented images (already at CLIP size, with their concept
    regions at 4× the CAM resolution); before each batch ``fresh_per_step`` of them are replaced by new ones and
    the pool re-renders a few primitives. WHY: composing + augmenting costs ~5 ms an image, a map nearly
    nothing, so every image is reused a few times, each time under a new random map (a new input and caption).
    Deterministic per seed: numpy draws the images, albumentations its own seeded generators, torch the maps.
    """

    def __init__(
        self,
        world: ToyWorld,
        concepts: Concepts,
        *,
        seed: int,
        clip_size: int,
        crop_size: int,
        resize_long: Sequence[int] | None,
        cam_stride: int,
        evidence_area: Sequence[float],
        mix: Mapping[str, float],
        masks: Mapping[str, float],
        pool: Mapping[str, int],
        hue_rotation: float,
    ) -> None:
        self.concepts, self.mix, self.masks, self.evidence_area = concepts, dict(mix), dict(masks), evidence_area
        self.clip_size, self.cam_size = clip_size, math.ceil(crop_size / cam_stride)
        self.region_size = 4 * self.cam_size
        self.rng = np.random.default_rng([seed, 0, 1])
        self.gen = torch.Generator().manual_seed(seed)
        self.transform = train_transform(crop_size, resize_long)
        self.transform.set_random_seed(seed)
        self.refresh, self.fresh = int(pool["refresh_per_step"]), int(pool["fresh_per_step"])
        self.hue_rotation = float(hue_rotation)
        self.pool = PrimitivePool(world, int(pool["per_class"]), int(pool["per_background"]), self.rng)
        n, k = int(pool["buffer_size"]), len(concepts.names)
        self.images = torch.empty(n, 3, clip_size, clip_size)
        self.regions = torch.empty(n, k, self.region_size, self.region_size)
        self._fill(torch.arange(n))

    def _fill(self, slots: torch.Tensor) -> None:
        """Compose, augment (the CLIMS training transform) and store new images in ``slots``."""
        images, codes = [], []
        for _ in range(len(slots)):
            rgb, code = compose_sample(self.pool, self.concepts, self.mix, self.rng, self.hue_rotation)
            out = self.transform(image=rgb, mask=code)
            images.append(out["image"])
            codes.append(out["mask"])
        self.images[slots] = to_clip_size(torch.stack(images), self.clip_size)
        self.regions[slots] = concept_regions(torch.stack(codes), len(self.concepts.names), self.region_size)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher inputs (n, 3, s, s), evidence (n, K)) under fresh random CAM-like maps."""
        self.pool.refresh(self.refresh, self.rng)
        self._fill(torch.randperm(len(self.images), generator=self.gen)[: self.fresh])
        idx = torch.randint(len(self.images), (n,), generator=self.gen)
        regions = self.regions[idx]
        maps = random_maps(area_pool(regions, self.cam_size), self.masks, self.gen)
        up = to_clip_size(maps, self.clip_size)
        return up * self.images[idx], evidence(regions, area_pool(up, self.region_size), self.evidence_area)


# ------------------------------------------------------------------------------------------------- losses
def multi_positive_loss(logits: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with soft, multiple positives: ½(KL image→concepts + KL concept→images).

    ``logits`` (B, K) = logit_scale·cos(image_b, concept_k); ``evidence`` (B, K) ≥ 0. Each row (image) is a
    softmax over the K concepts with target = its evidence normalised to sum 1; each column (concept) a
    softmax over the B images with target = that concept's evidence over the batch normalised. Rows/columns
    without evidence (a fully masked image, a concept absent from the batch) have no target and are skipped.
    KL = cross-entropy − target entropy: the same gradients, but 0 at the optimum, so the logged value says
    how far the teacher is from its targets (cross-entropy with several positives never reaches 0).
    """
    return 0.5 * (_soft_kl(logits, evidence) + _soft_kl(logits.T, evidence.T))


def _soft_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mass = target.sum(1)
    keep = mass > 0
    if not keep.any():
        return logits.sum() * 0.0
    p = target[keep] / mass[keep, None]
    return (torch.special.xlogy(p, p) - p * logits[keep].log_softmax(1)).sum(1).mean()


def range_loss(cosine: torch.Tensor, evidence: torch.Tensor, sim_range: Sequence[float]) -> torch.Tensor:
    """Mean squared distance of each cosine to ``lo + (hi − lo)·evidence``: keeps similarities CLIP-like."""
    lo, hi = float(sim_range[0]), float(sim_range[1])
    return ((cosine - (lo + (hi - lo) * evidence)) ** 2).mean()


# ------------------------------------------------------------------------------------------------ training
def concept_features(model: torch.nn.Module, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
    """(K, D) unit text features, templates averaged and re-normalised as ClipEvaluator does."""
    feats = F.normalize(model.encode_text(tokens), dim=-1)
    if n_templates == 1:
        return feats
    return F.normalize(feats.view(-1, n_templates, feats.shape[-1]).mean(1), dim=-1)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, embeddings' scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_toyclip(cfg: DictConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``cfg.arch`` from scratch on on-the-fly toy captions; returns (model, training record)."""
    tc, lc = cfg.train, cfg.loss
    register_tiny_configs()
    concepts = toy_concepts(cfg.prompts)
    torch.manual_seed(int(cfg.seed))
    model = open_clip.create_model(cfg.arch, pretrained=None)
    model.token_embedding.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    tokens = tokenizer([p for group in concepts.prompts for p in group])
    n_templates = len(concepts.bank.templates)
    sampler = _sampler(cfg, concepts, clip_input_size(model))
    opt = _optimizer(model, float(tc.lr), float(tc.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, int(tc.warmup_steps), int(tc.steps)))
    model.train()
    start, cpu_start, history = time.perf_counter(), time.process_time(), []
    for step in range(int(tc.steps)):
        x, e = sampler.batch(int(tc.batch_size))
        cos = F.normalize(model.encode_image(x), dim=-1) @ concept_features(model, tokens, n_templates).T
        contrastive = multi_positive_loss(model.logit_scale.exp() * cos, e)
        calibration = range_loss(cos, e, lc.sim_range)
        loss = contrastive + float(lc.range_weight) * calibration
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append([float(contrastive.detach()), float(calibration.detach())])
        if (step + 1) % int(tc.log_every) == 0 or step + 1 == int(tc.steps):
            c, r = np.mean(history[-int(tc.log_every) :], axis=0)
            log.info(
                "toyclip step %d/%d  contrastive %.4f  range %.5f  (%.0f s)",
                step + 1,
                tc.steps,
                c,
                r,
                time.perf_counter() - start,
            )
    model.eval()
    c, r = np.mean(history[-min(50, len(history)) :], axis=0)
    record = {
        "steps": int(tc.steps),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "final_contrastive": float(c),
        "final_range": float(r),
    }
    return model, record


def _sampler(cfg: DictConfig, concepts: Concepts, clip_size: int, seed: int | None = None) -> CaptionSampler:
    return CaptionSampler(
        instantiate(cfg.world),
        concepts,
        seed=int(cfg.seed if seed is None else seed),
        clip_size=clip_size,
        crop_size=int(cfg.crop_size),
        resize_long=cfg.resize_long,
        cam_stride=int(cfg.cam_stride),
        evidence_area=cfg.loss.evidence_area,
        mix=cfg.train.mix,
        masks=cfg.train.masks,
        pool=cfg.train.pool,
        hue_rotation=float(cfg.train.hue_rotation),
    )


# -------------------------------------------------------------------------------------------------- cache
def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that changes the trained weights (not eval, paths, threads or logging)."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.pop("num_threads", None)
    train.pop("log_every", None)
    keyed = {
        "model": cfg.arch,
        "model_config": json.loads((CONFIG_DIR / f"{cfg.arch}.json").read_text())  # parsed: layout-independent
        if (CONFIG_DIR / f"{cfg.arch}.json").is_file()
        else None,
        "prompts": Path(toy_concepts(cfg.prompts).bank.source).read_text(),
        "toy_version": TOY_VERSION,
        "open_clip": open_clip.__version__,
        "seed": int(cfg.seed),
        "world": OmegaConf.to_container(cfg.world, resolve=True),
        "pipeline": [
            cfg.crop_size,
            OmegaConf.to_container(cfg.resize_long) if cfg.resize_long else None,
            cfg.cam_stride,
        ],
        "train": train,
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
    }
    return digest(keyed)


def ensure_toyclip(cfg: DictConfig) -> dict[str, Any]:
    """Train and save the checkpoint unless a cached one with the same config hash exists.

    Returns the sidecar record plus ``trained`` (False on a cache hit) and ``checkpoint``.
    """
    ckpt = Path(cfg.checkpoint)
    sidecar = ckpt.with_name(ckpt.name + ".json")
    digest = config_hash(cfg)
    if ckpt.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("config_hash") == digest:
        log.info("toyclip: cached checkpoint %s (config hash %s): not retraining", ckpt, digest)
        return {**json.loads(sidecar.read_text()), "trained": False, "checkpoint": str(ckpt)}
    model, record = train_toyclip(cfg)
    with atomic_path(ckpt) as tmp:
        torch.save(model.state_dict(), tmp)
    record = {"config_hash": digest, "model": cfg.arch, "seed": int(cfg.seed), **record}
    atomic_write_json(sidecar, record)
    log.info("toyclip: trained in %.0f s, saved %s", record["wall_s"], ckpt)
    return {**record, "trained": True, "checkpoint": str(ckpt)}


# ------------------------------------------------------------------------------------------------ metrics
def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().float().flatten()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95]))
    return {"min": float(v.min()), "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def _normalised(rgbs: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([imagenet_normalize(x) for x in rgbs])).permute(0, 3, 1, 2).contiguous()


@dataclass
class WholeImageScores:
    """Cosines of unmasked images to every class prompt (N, C) and every background prompt (N, B)."""

    classes: torch.Tensor
    backgrounds: torch.Tensor


def _whole_image_scores(evaluator: ClipEvaluator, images: torch.Tensor, num_classes: int) -> WholeImageScores:
    """Score whole images through the evaluator: all-ones maps and labels make every fg crop the image."""
    n, _, h, w = images.shape
    labels = torch.ones(n, num_classes)
    scores = evaluator(torch.ones(n, num_classes, h, w), images, labels)
    return WholeImageScores(scores.s_fg.view(n, num_classes), scores.s_fg_bg.view(n, num_classes, -1)[:, 0])


@torch.no_grad()
def evaluate_toyclip(cfg: DictConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Zero-shot accuracies and CLIMS similarity ranges on held-out renders (``eval.seed``), via ClipEvaluator.

    * ``object_alone_acc``: render_object images → argmax over class prompts is its class.
    * ``scene_object_acc``: dataset-like render_scene images → argmax over class prompts is a present class.
    * ``background_acc``: render_background of each named background → argmax over background prompts.
    * ``sims``: on scenes, with "perfect CAMs" (each present class's mask pooled to stride 16): fg crop vs its
      class prompt (OTM), bg crop vs the same prompt (BTM), fg crop vs background prompts (CBS, with the share
      above the 0.26 threshold); background-alone images vs their own prompt and vs class prompts.
    """
    concepts = toy_concepts(cfg.prompts)
    world: ToyWorld = instantiate(cfg.world)
    rng = np.random.default_rng([int(cfg.eval.seed), 0, 2])
    evaluator = ClipEvaluator(cfg.arch, pretrained=str(checkpoint), precision="fp32", normalize="reference")
    evaluator.set_prompts(concepts.bank.class_prompts(), concepts.bank.background_prompts())
    c, per = concepts.num_classes, int(cfg.eval.per_kind)
    # Objects alone, per class in bank order.
    objects = [world.render_object(name, rng)[0] for name in concepts.bank.classes for _ in range(per)]
    obj_truth = torch.arange(c).repeat_interleave(per)
    obj = _whole_image_scores(evaluator, _normalised(objects), c)
    # Backgrounds alone, per named background.
    bgs = [world.render_background(name, rng) for name in concepts.bank.background for _ in range(per)]
    bg_truth = torch.arange(len(concepts.bank.background)).repeat_interleave(per)
    bg = _whole_image_scores(evaluator, _normalised(bgs), c)
    # Dataset-like scenes.
    scenes = [world.render_scene(rng) for _ in range(int(cfg.eval.scenes))]
    images = _normalised([s.rgb for s in scenes])
    whole = _whole_image_scores(evaluator, images, c)
    present = torch.zeros(len(scenes), c)
    for i, s in enumerate(scenes):
        present[i, [concepts.world_class(k) for k in s.class_indices]] = 1
    scene_hit = present.gather(1, whole.classes.argmax(1, keepdim=True)).squeeze(1)
    maps = _perfect_cams(scenes, concepts, int(cfg.cam_stride))
    crops = evaluator(maps, images, present)
    threshold = float(cfg.eval.cbs_threshold)
    own_bg = bg.backgrounds.gather(1, bg_truth.view(-1, 1)).squeeze(1)
    return {
        "object_alone_acc": float((obj.classes.argmax(1) == obj_truth).float().mean()),
        "scene_object_acc": float(scene_hit.mean()),
        "background_acc": float((bg.backgrounds.argmax(1) == bg_truth).float().mean()),
        "sims": {
            "fg_crop_vs_own_class": _summary(crops.s_fg),
            "bg_crop_vs_own_class": _summary(crops.s_bg),
            "fg_crop_vs_background_prompts": _summary(crops.s_fg_bg),
            "fg_crop_background_above_threshold": float((crops.s_fg_bg > threshold).float().mean()),
            "background_alone_vs_own_prompt": _summary(own_bg),
            "background_alone_above_threshold": float((own_bg > threshold).float().mean()),
            "background_alone_vs_class_prompts": _summary(bg.classes),
            "object_alone_vs_own_class": _summary(obj.classes.gather(1, obj_truth.view(-1, 1))),
        },
        "eval": {"seed": int(cfg.eval.seed), "per_kind": per, "scenes": len(scenes), "cbs_threshold": threshold},
    }


def _perfect_cams(scenes: Sequence[Any], concepts: Concepts, stride: int) -> torch.Tensor:
    """(N, C, ⌈S/stride⌉, ⌈S/stride⌉) maps = each class's ground-truth area fraction per CAM cell."""
    size = scenes[0].mask.shape[0]
    cells = math.ceil(size / stride)
    masks = torch.from_numpy(np.stack([s.mask for s in scenes])).long()
    world_to_bank = torch.tensor([concepts.world_class(i) for i in range(len(TOY_CLASSES))])
    codes = torch.where(
        (masks >= 1) & (masks <= len(TOY_CLASSES)), world_to_bank[(masks - 1).clamp(0, len(TOY_CLASSES) - 1)], -1
    )
    return concept_regions(codes, concepts.num_classes, cells)
