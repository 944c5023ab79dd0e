"""Caption data of the toy CLIP: masked renders of the toy world and their soft multi-hot *evidence* captions.

Nothing is read from the generated dataset (images, masks, annotations): every image and its caption come from
:class:`~clims_pl.data.toy.ToyWorld`, so the teacher never sees the labels CLIMS is evaluated on.

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
the teacher cannot learn the co-occurrence it must help remove. Its caption is a soft multi-hot evidence
vector over the concepts (classes then named backgrounds): e_k = visible (mask-weighted) area of concept k
divided by its area clamped to ``evidence_area`` = [a_min, a_sat] of the image. An object half hidden by the
mask scores 0.5, a background is fully "there" once a_sat of the image shows it, unnamed textures (wall, sand)
and the canvas count for nothing.

**Speed.** Rendering a scene costs ~14 ms; objects and textures are rendered into a pool (a few re-rendered
every step), composed per sample, and the composed, augmented images are kept in a buffer that is partly
replaced every step, each image reused under new random maps (:class:`CaptionSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from clims_pl.data.toy import NEUTRAL_RGB, TOY_BACKGROUNDS, TOY_CLASSES, ToyWorld
from clims_pl.data.transforms import seed_transform, train_transform
from clims_pl.models.clip_evaluator import register_tiny_configs
from clims_pl.prompts.bank import PromptBank, load_prompt_bank

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
        raise ValueError(f"data.mix: unknown kind {kind!r}; use object, background, composite")
    for _ in range(n_objects):
        _paste_object(rgb, codes, pool, concepts, rng, hue_rotation)
    return rgb, codes


def _probabilities(weights: Mapping[str, float]) -> np.ndarray:
    p = np.asarray([float(v) for v in weights.values()])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(
            f"data.mix / data.masks: mixture weights must be >= 0 with a positive sum, got {dict(weights)}"
        )
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
    Deterministic per (seed, start_step): numpy draws the images, albumentations its own seeded generators, torch the maps.
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
        start_step: int = 0,
    ) -> None:
        self.concepts, self.mix, self.masks, self.evidence_area = concepts, dict(mix), dict(masks), evidence_area
        self.clip_size, self.cam_size = clip_size, math.ceil(crop_size / cam_stride)
        self.region_size = 4 * self.cam_size
        self.rng = np.random.default_rng([seed, start_step, 1])
        # The stream of a resumed run (start_step > 0) is another one of the same seed, not a replay of step 0's.
        torch_seed = seed if start_step == 0 else int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0])
        self.gen = torch.Generator().manual_seed(torch_seed)
        self.transform = train_transform(crop_size, resize_long)
        seed_transform(self.transform, torch_seed)
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


class CaptionStream(IterableDataset):
    """An endless stream of caption batches (one item = one batch) from a :class:`CaptionSampler`.

    The sampler is built when iteration starts (in the loading process), seeded by ``seed`` and ``start_step`` =
    the trainer's global step then: a run resumed from ``last.ckpt`` continues with a stream of its own instead of
    replaying the first steps' batches.
    """

    def __init__(self, make_sampler: Any, batch_size: int, start_step: int = 0) -> None:
        self.make_sampler, self.batch_size, self.start_step = make_sampler, batch_size, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.make_sampler(start_step=self.start_step)
        while True:
            yield sampler.batch(self.batch_size)


class ToyCaptionDataModule(L.LightningDataModule):
    """Train batches ``(teacher inputs (B, 3, s, s), evidence (B, K))`` of the toy CLIP; no validation data.

    ``arch`` (the open_clip model the batches are for) sets the input side ``s``; the run length is the trainer's
    ``max_steps`` (the stream never ends).
    """

    def __init__(self, arch: str, prompts: str, world: ToyWorld, *, seed: int, batch_size: int, **options: Any) -> None:
        """``options``: the :class:`CaptionSampler` settings (crop_size, resize_long, cam_stride, evidence_area, mix,
        masks, pool, hue_rotation), passed on as given."""
        super().__init__()
        register_tiny_configs()
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(
                f"data.arch={arch}: not an open_clip architecture; one of models/clip_configs or open_clip"
            )
        size = config["vision_cfg"]["image_size"]
        self.clip_size = int(size if isinstance(size, int) else size[0])
        self.concepts = toy_concepts(prompts)
        self.world, self.seed, self.batch_size, self.options = world, int(seed), int(batch_size), options

    def sampler(self, start_step: int = 0) -> CaptionSampler:
        """A fresh sampler of this module's settings (the stream of ``start_step``)."""
        return CaptionSampler(
            self.world, self.concepts, seed=self.seed, clip_size=self.clip_size, start_step=start_step, **self.options
        )

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(CaptionStream(self.sampler, self.batch_size, start), batch_size=None, num_workers=0)
