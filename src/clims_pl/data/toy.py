"""A procedural toy world in the exact VOC2012 layout: the offline stand-in that shows what CLIMS fixes.

Each image holds 1–3 objects of :data:`TOY_CLASSES` (VOC class names) on textured backgrounds. The world is
built so that a CAM classifier is tempted into CLIMS's two failure modes:

* **Under-coverage.** Every object is a large *body* (superellipse silhouette, colour from one shared
  distribution) painted with a class-specific two-tone *pattern* (:data:`TOY_PATTERNS`: stripes along the
  body, stripes across it, polka dots, a checkerboard; each darkens about half the body) plus a small
  class-specific *part* (:data:`TOY_PARTS`: a swept tail fin, a symmetric sail, two horns, a chimney).
  Nothing differs by colour, so the class is read from shape and pattern; the part plus a patch of pattern
  is enough for a classifier, so its CAM need not cover the body. Patterns are what a tiny CLIP trained
  for minutes on 2 CPU cores can learn; shape-only parts it cannot (docs/toy_world.md).
* **Co-occurring background.** Each class has a background (:data:`TOY_COOCCURRING`: aeroplane–sky,
  boat–water, cow–grass, train–railroad) present in ~80% of that class's images, so the background is strong
  (but not perfect) evidence and CAMs spill onto it. The other ~20% use a neutral texture (wall, sand) or
  another class's background; neutral bands also appear above/below co-occurring ones.

Rendering API (also used to make image–caption pairs for a toy CLIP without any dataset masks)::

    world = ToyWorld(size=128, seed=0)
    rgb, alpha = world.render_object("cow", rng)       # one object on the neutral canvas
    rgb = world.render_background("grass", rng)        # one full-frame texture
    scene = world.render_scene(rng)                    # Scene(rgb, mask, class_indices, backgrounds, boxes)
    scene = world.scene(i)                             # image i of the dataset generated with this seed

The neutral canvas is the ImageNet mean colour, i.e. exactly what CLIMS's masking (``cam * normalised
image``) turns removed pixels into, so a toy CLIP trained on ``render_object`` sees the same canvas as the
masked foregrounds it later scores.

:func:`generate_toy` writes JPEGImages/, Annotations/ (VOC XML), SegmentationClass/ and
SegmentationClassAug/ (palette PNGs; 0 background, class index + 1 objects, a thin 255 band along object
boundaries like VOC), ImageSets/Segmentation/{train,val,trainval,train_aug}.txt and ``toy.json`` (generation
parameters and each image's backgrounds). ``train`` (the evaluation split, as on VOC) ⊂ ``train_aug``;
``val`` is disjoint. Ground-truth masks are exactly the painted object pixels.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from tqdm import tqdm

from clims_pl.data.imageio import VOC_PALETTE

TOY_CLASSES: tuple[str, ...] = ("aeroplane", "boat", "cow", "train")
TOY_BACKGROUNDS: tuple[str, ...] = ("sky", "water", "grass", "railroad", "wall", "sand")
TOY_COOCCURRING: dict[str, str] = {"aeroplane": "sky", "boat": "water", "cow": "grass", "train": "railroad"}
TOY_NEUTRAL: tuple[str, ...] = ("wall", "sand")
TOY_PARTS: dict[str, str] = {"aeroplane": "tail", "boat": "sail", "cow": "horns", "train": "chimney"}
TOY_PATTERNS: dict[str, str] = {
    "aeroplane": "stripes along",
    "boat": "stripes across",
    "cow": "polka dots",
    "train": "checkerboard",
}
#: ImageNet mean colour: 0 after normalisation, the colour of CLIMS's masked-out pixels.
NEUTRAL_RGB: tuple[int, int, int] = (124, 116, 104)
#: Bumped whenever the rendering or the sampling of scenes changes, so an older world on disk is refused, never
#: silently reused (docs/toy_world.md).
TOY_VERSION = 5
#: Per-pixel background index (into TOY_BACKGROUNDS) of train and val images, as grayscale PNGs.
BACKGROUND_DIR = "ToyBackground"
#: The world's generation parameters and per-image backgrounds, at the top of its root.
TOY_META = "toy.json"

P_COOCCUR = 0.8  # a class's image shows its co-occurring background (docs/toy_world.md: why not 0.9)
P_TWO_CLASSES = 0.25  # an image holds two distinct classes (else one)
P_NEUTRAL_BAND = 0.3  # a single-background image gets a neutral band above or below
PATTERN_DARK = 0.2  # brightness of the pattern's dark half: high contrast, so a small CNN learns it quickly
BAND_WIDTH = 1  # pixels of 255 outside each object boundary (VOC's void band, scaled to 128 px)

# Band order from the top of the image: sky above everything, walls above the ground textures.
_BAND_RANK = {"sky": 0, "wall": 1}


class ToyError(ValueError):
    """A toy root clashes with the requested world; the message says which file and what to do."""


class Scene(NamedTuple):
    """One rendered image with its exact ground truth."""

    rgb: np.ndarray  #: (S, S, 3) uint8
    mask: np.ndarray  #: (S, S) uint8: 0 background, class index + 1, 255 boundary band
    class_indices: tuple[int, ...]  #: class index of each object, in painting order
    backgrounds: tuple[str, ...]  #: 1 or 2 background names, top band first
    boxes: tuple[tuple[int, int, int, int], ...]  #: visible (xmin, ymin, xmax, ymax) per object, 0-based
    #: (S, S) uint8 index into TOY_BACKGROUNDS of the texture behind each pixel (also under objects): lets the
    #: evaluation count how much of a class's co-occurring background a CAM claims.
    background: np.ndarray


class _Pose(NamedTuple):
    cx: float
    cy: float
    b: float  # body half-height in pixels; every length of the object is in units of b
    r: float  # body aspect: half-length / half-height
    p: float  # superellipse exponent of the body
    angle: float
    flip: float  # +1 faces right, -1 faces left
    phase: tuple[float, float]  # offset of the body pattern, in pattern periods


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _convex(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Pixels inside a convex polygon (any winding): all edge cross products share one sign."""
    crosses = []
    for (u0, v0), (u1, v1) in zip(verts, verts[1:] + verts[:1], strict=True):
        crosses.append((u1 - u0) * (v - v0) - (v1 - v0) * (u - u0))
    stacked = np.stack(crosses)
    return (stacked >= 0).all(0) | (stacked <= 0).all(0)


def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, radius: float) -> np.ndarray:
    return (u - cu) ** 2 + (v - cv) ** 2 <= radius**2


# Parts in body coordinates (u forward, v up, unit = body half-height b; the body spans |u| <= r).
# Each starts inside the body so it is attached; shapes and positions differ, colours do not.
def _tail(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Swept fin at the rear: a trapezoid leaning backwards."""
    return _convex(u, v, [(-r - 0.15, 0.2), (-r + 0.85, 0.2), (-r + 0.3, 1.75), (-r - 0.3, 1.75)])


def _sail(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Tall symmetric triangle rising from mid-body."""
    return _convex(u, v, [(-0.7, 0.3), (0.7, 0.3), (0.0, 2.45)])


def _horns(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Two crescents curving forward over the front of the body."""
    out = np.zeros(u.shape, dtype=bool)
    for cu in (r - 0.6, r - 1.45):
        out |= _disc(u, v, cu, 0.95, 0.65) & ~_disc(u, v, cu - 0.3, 0.75, 0.55) & (v > 0.35)
    return out


def _chimney(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Block stack with a wider cap near the front."""
    stack = (u >= r - 1.3) & (u <= r - 0.7) & (v >= 0.3) & (v <= 1.45)
    cap = (u >= r - 1.55) & (u <= r - 0.45) & (v > 1.45) & (v <= 1.85)
    return stack | cap


_PART_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "aeroplane": _tail,
    "boat": _sail,
    "cow": _horns,
    "train": _chimney,
}


# Body patterns in the same body coordinates, so they turn and scale with the object. Each darkens ~half of
# the body (equal mean colour across classes); `phase` is a random offset in [0, 1)^2 per object.
def _stripes_along(u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    return np.mod(v + phase[0], 1.0) < 0.5


def _stripes_across(u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    return np.mod(u + phase[0], 1.0) < 0.5


def _polka_dots(u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    du = np.mod(u / 1.1 + phase[0], 1.0) - 0.5
    dv = np.mod(v / 1.1 + phase[1], 1.0) - 0.5
    return du**2 + dv**2 <= 0.4**2  # radius 0.44 b on a 1.1 b lattice: ~50% of the body


def _checkerboard(u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    cells = np.floor(u / 0.7 + phase[0]) + np.floor(v / 0.7 + phase[1])
    return np.mod(cells, 2) == 0


_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray, tuple[float, float]], np.ndarray]] = {
    "aeroplane": _stripes_along,
    "boat": _stripes_across,
    "cow": _polka_dots,
    "train": _checkerboard,
}
# How far body ∪ part reach beyond the body's ends (u = ±r) and its height, in units of b (see parts above).
_REACH_BACK, _REACH_FRONT = 0.35, 0.05
_REACH_DOWN, _REACH_UP = 1.05, 2.5


class ToyWorld:
    """Deterministic renderer of toy objects, backgrounds and scenes at ``size`` × ``size`` pixels.

    Every method draws from the ``rng`` it is given (``numpy.random.Generator``), so callers control
    reproducibility; :meth:`scene` derives the generator of image ``index`` from ``(seed, index)``, making
    each image independent of the others and of generation order.
    """

    def __init__(self, size: int = 128, seed: int = 0) -> None:
        if size < 32:
            raise ToyError(f"toy size {size} is too small to draw objects: use at least 32")
        self.size = int(size)
        self.seed = int(seed)
        grid = np.arange(self.size, dtype=np.float32)
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")
        self._textures: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
            "sky": self._sky,
            "water": self._water,
            "grass": self._grass,
            "railroad": self._railroad,
            "wall": self._wall,
            "sand": self._sand,
        }

    # ----------------------------------------------------------------------------------------- public API
    def scene(self, index: int) -> Scene:
        """Image ``index`` of the dataset this world generates (same seed, same image)."""
        return self.render_scene(np.random.default_rng([self.seed, index]))

    def render_background(self, name: str, rng: np.random.Generator) -> np.ndarray:
        """(S, S, 3) uint8 full-frame texture ``name`` (one of TOY_BACKGROUNDS)."""
        if name not in self._textures:
            raise ToyError(f"unknown toy background {name!r}: use one of {', '.join(TOY_BACKGROUNDS)}")
        return _to_uint8(self._textures[name](rng))

    def render_object(self, class_name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One object of ``class_name`` in a random pose near the centre of the neutral canvas.

        Returns ``(rgb (S, S, 3) uint8, alpha (S, S) bool)``; alpha marks the painted body ∪ part.
        """
        cls = self._class_index(class_name)
        pose = self._sample_pose(rng, scale=1.0, centre=True)
        canvas = np.empty((self.size, self.size, 3), dtype=np.float32)
        canvas[:] = NEUTRAL_RGB
        body, part, dark = self._shape(cls, pose)
        self._paint(canvas, body, part, dark, rng)
        return _to_uint8(canvas), body | part

    def render_scene(self, rng: np.random.Generator) -> Scene:
        """A full image: backgrounds (1–2 bands), 1–3 objects, and the exact label mask."""
        distinct = sorted(int(c) for c in rng.choice(len(TOY_CLASSES), self._n_classes(rng), replace=False))
        n_objects = int(rng.integers(len(distinct), 4))
        classes = distinct + [int(c) for c in rng.choice(distinct, n_objects - len(distinct))]
        rng.shuffle(classes)
        backgrounds = self._sample_backgrounds(distinct, rng)
        canvas, horizon = self._compose_backgrounds(backgrounds, rng)
        shapes = self._place_objects(classes, backgrounds, horizon, rng)
        instance = np.zeros((self.size, self.size), dtype=np.int32)
        mask = np.zeros((self.size, self.size), dtype=np.uint8)
        for k, (cls, (body, part, dark)) in enumerate(zip(classes, shapes, strict=True)):
            self._paint(canvas, body, part, dark, rng)
            instance[body | part] = k + 1
            mask[body | part] = cls + 1
        mask[_boundary_band(instance, BAND_WIDTH)] = 255
        boxes = []
        for k in range(len(classes)):
            ys, xs = np.nonzero(instance == k + 1)
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
        below = np.zeros_like(mask, dtype=bool) if horizon is None else self._yy >= horizon[None, :]
        background = np.where(below, TOY_BACKGROUNDS.index(backgrounds[-1]), TOY_BACKGROUNDS.index(backgrounds[0]))
        return Scene(_to_uint8(canvas), mask, tuple(classes), backgrounds, tuple(boxes), background.astype(np.uint8))

    # ------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def _class_index(class_name: str) -> int:
        if class_name not in TOY_CLASSES:
            raise ToyError(f"unknown toy class {class_name!r}: use one of {', '.join(TOY_CLASSES)}")
        return TOY_CLASSES.index(class_name)

    @staticmethod
    def _n_classes(rng: np.random.Generator) -> int:
        return 2 if rng.random() < P_TWO_CLASSES else 1

    @staticmethod
    def _sample_backgrounds(distinct: list[int], rng: np.random.Generator) -> tuple[str, ...]:
        """Each present class brings its co-occurring background with P_COOCCUR; else another background."""
        own = [TOY_COOCCURRING[TOY_CLASSES[c]] for c in distinct]
        chosen = [bg for bg in own if rng.random() < P_COOCCUR]
        if not chosen:
            others = [bg for bg in TOY_BACKGROUNDS if bg not in own]
            chosen = [others[int(rng.integers(len(others)))]]
        if len(chosen) == 1 and rng.random() < P_NEUTRAL_BAND:
            neutral = [bg for bg in TOY_NEUTRAL if bg != chosen[0]]
            chosen.append(neutral[int(rng.integers(len(neutral)))])
        rng.shuffle(chosen)
        return tuple(sorted(chosen, key=lambda bg: _BAND_RANK.get(bg, 2)))

    def _sample_pose(self, rng: np.random.Generator, scale: float, centre: bool = False) -> _Pose:
        """Random size, aspect, rotation (±20°) and facing; a centre that keeps the object in frame."""
        S = self.size
        b = float(rng.uniform(0.085, 0.125)) * S * scale
        r = float(rng.uniform(1.9, 2.7))
        p = float(rng.uniform(2.2, 3.5))
        angle = float(rng.uniform(-0.35, 0.35))
        flip = 1.0 if rng.random() < 0.5 else -1.0
        (x_lo, x_hi), (y_lo, y_hi) = self._centre_range(b, r, angle, flip)
        if centre:
            cx = S / 2 + float(rng.uniform(-0.05, 0.05)) * S
            cy = S / 2 + float(rng.uniform(-0.05, 0.05)) * S
            cx, cy = float(np.clip(cx, x_lo, x_hi)), float(np.clip(cy, y_lo, y_hi))
        else:
            cx, cy = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
        phase = (float(rng.random()), float(rng.random()))
        return _Pose(cx, cy, b, r, p, angle, flip, phase)

    def _centre_range(self, b: float, r: float, angle: float, flip: float) -> tuple[tuple[float, float], ...]:
        """Centre positions for which the rotated extent box of the object stays inside the image."""
        us = np.array([-r - _REACH_BACK, r + _REACH_FRONT]) * b
        vs = np.array([-_REACH_DOWN, _REACH_UP]) * b
        corners_u, corners_v = np.meshgrid(us, vs)
        c, s = np.cos(angle), np.sin(angle)
        dx = flip * corners_u * c + corners_v * s
        dy = flip * corners_u * s - corners_v * c
        margin = 1.0 + BAND_WIDTH
        x_lo, x_hi = margin - dx.min(), self.size - 1 - margin - dx.max()
        y_lo, y_hi = margin - dy.min(), self.size - 1 - margin - dy.max()
        return (x_lo, max(x_lo, x_hi)), (y_lo, max(y_lo, y_hi))

    def _shape(self, cls: int, pose: _Pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(body, part, dark) boolean masks of one object: implicit shapes evaluated at every pixel.

        ``dark`` marks the body pixels that the class pattern darkens (phase fixed by the pose).
        """
        dx, dy = self._xx - pose.cx, self._yy - pose.cy
        c, s = np.cos(pose.angle), np.sin(pose.angle)
        u = pose.flip * (dx * c + dy * s) / pose.b
        v = (dx * s - dy * c) / pose.b
        body = np.abs(u / pose.r) ** pose.p + np.abs(v) ** pose.p <= 1.0
        part = _PART_SHAPES[TOY_CLASSES[cls]](u, v, pose.r) & ~body
        dark = _PATTERNS[TOY_CLASSES[cls]](u, v, pose.phase) & body
        return body, part, dark

    def _place_objects(
        self, classes: list[int], backgrounds: tuple[str, ...], horizon: np.ndarray | None, rng: np.random.Generator
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Poses with limited overlap (every object and part stays mostly visible), objects on their band."""
        scale = (1.0, 0.9, 0.8)[len(classes) - 1]
        for _ in range(100):
            shapes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            for cls in classes:
                for _ in range(30):
                    pose = self._sample_pose(rng, scale)
                    pose = self._on_own_band(pose, cls, backgrounds, horizon, rng)
                    body, part, dark = self._shape(cls, pose)
                    if _fits(body | part, shapes):
                        shapes.append((body, part, dark))
                        break
                else:
                    break
            if len(shapes) == len(classes):
                return shapes
            scale *= 0.95
        raise RuntimeError("toy scene placement failed after 100 attempts")  # unreachable at sizes >= 32

    def _on_own_band(
        self,
        pose: _Pose,
        cls: int,
        backgrounds: tuple[str, ...],
        horizon: np.ndarray | None,
        rng: np.random.Generator,
    ) -> _Pose:
        """With two bands, move the object's centre into the band of its co-occurring background."""
        own = TOY_COOCCURRING[TOY_CLASSES[cls]]
        if horizon is None or own not in backgrounds:
            return pose
        (_, _), (y_lo, y_hi) = self._centre_range(pose.b, pose.r, pose.angle, pose.flip)
        h = float(horizon.mean())
        lo, hi = (y_lo, min(y_hi, h)) if backgrounds.index(own) == 0 else (max(y_lo, h), y_hi)
        if lo >= hi:
            return pose
        return pose._replace(cy=float(rng.uniform(lo, hi)))

    # ---------------------------------------------------------------------------------------- painting
    def _paint(
        self, canvas: np.ndarray, body: np.ndarray, part: np.ndarray, dark: np.ndarray, rng: np.random.Generator
    ) -> None:
        """Body: shared colour law, class pattern darkened; part: another colour from the same law; outline."""
        hue = float(rng.random())
        body_rgb = _hsv(hue, rng.uniform(0.35, 0.8), rng.uniform(0.5, 0.9))
        part_rgb = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.35, 0.8), rng.uniform(0.5, 0.9))
        shade = 0.85 + 0.3 * self._noise(rng, (3, 3))
        texture = np.where(dark, PATTERN_DARK, 1.0) * shade
        canvas[body] = body_rgb * texture[body][:, None]
        canvas[part] = part_rgb * (0.9 + 0.2 * self._noise(rng, (4, 4)))[part][:, None]
        obj = body | part
        outline = obj & _touches(~obj, 1)
        canvas[outline] *= 0.45

    def _compose_backgrounds(
        self, names: tuple[str, ...], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One texture, or two split by a wavy horizon; returns (canvas float32, horizon row per column)."""
        top = self._textures[names[0]](rng)
        if len(names) == 1:
            return top, None
        bottom = self._textures[names[1]](rng)
        S = self.size
        horizon = S * (rng.uniform(0.38, 0.62) + 0.12 * (self._noise(rng, (2, 4))[0] - 0.5))
        below = self._yy >= horizon[None, :]
        return np.where(below[..., None], bottom, top), horizon

    # ---------------------------------------------------------------------------------------- textures
    def _noise(self, rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
        """Smooth value noise in [0, 1]: a random (cells+1) grid upsampled bicubically to S × S."""
        grid = rng.random((cells[0] + 1, cells[1] + 1)).astype(np.float32)
        up = Image.fromarray(grid).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(up), 0.0, 1.0)

    def _fine(self, rng: np.random.Generator, period: float = 3.0) -> np.ndarray:
        n = max(2, int(self.size / period))
        return self._noise(rng, (n, n))

    def _sky(self, rng: np.random.Generator) -> np.ndarray:
        y = (self._yy / self.size)[..., None]
        top = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.45, 0.75), rng.uniform(0.7, 0.92))
        img = top + (255.0 - top) * 0.45 * y
        cloud = (np.clip((self._noise(rng, (3, 5)) - 0.5) * 3.0, 0, 1) * rng.uniform(0.5, 0.9))[..., None]
        return (img * (1 - cloud) + 245.0 * cloud) * (0.97 + 0.06 * self._fine(rng, 6))[..., None]

    def _water(self, rng: np.random.Generator) -> np.ndarray:
        base = _hsv(rng.uniform(0.5, 0.6), rng.uniform(0.5, 0.8), rng.uniform(0.4, 0.65))
        wavelength = self.size * rng.uniform(0.06, 0.1)
        wave = np.sin(2 * np.pi * (self._yy / wavelength + 1.5 * self._noise(rng, (3, 4))))
        img = base * (1 + 0.22 * wave)[..., None]
        glint = ((wave > 0.9) & (self._fine(rng, 4) > 0.55))[..., None]
        return np.where(glint, 0.5 * img + 0.5 * 240.0, img)

    def _grass(self, rng: np.random.Generator) -> np.ndarray:
        base = _hsv(rng.uniform(0.22, 0.33), rng.uniform(0.5, 0.8), rng.uniform(0.4, 0.7))
        blades = self._noise(rng, (max(2, self.size // 16), max(2, self.size // 2)))  # vertical streaks
        return base * (0.65 + 0.45 * blades + 0.2 * self._fine(rng))[..., None]

    def _railroad(self, rng: np.random.Generator) -> np.ndarray:
        S = self.size
        gravel = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.1, 0.25), rng.uniform(0.45, 0.6))
        img = gravel * (0.7 + 0.5 * self._fine(rng))[..., None]
        spacing = S * rng.uniform(0.3, 0.42)
        gauge = spacing * 0.45
        across = np.mod(self._yy - rng.uniform(0, spacing), spacing)  # 0 and `gauge` are the two rails
        tie_period = S * rng.uniform(0.07, 0.1)
        along = np.mod(self._xx - rng.uniform(0, tie_period), tie_period)
        under_track = (across < 1.25 * gauge) | (across > spacing - 0.25 * gauge)
        ties = (along < 0.45 * tie_period) & under_track
        img[ties] = (
            _hsv(0.07, rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.4)) * (0.8 + 0.3 * self._fine(rng))[ties][:, None]
        )
        rail_w = max(1.0, S / 90)
        to_rail = np.minimum(np.minimum(across, spacing - across), np.abs(across - gauge))
        rails = to_rail < rail_w
        img[rails] = _hsv(0.6, 0.05, rng.uniform(0.7, 0.8))
        return img

    def _wall(self, rng: np.random.Generator) -> np.ndarray:
        S = self.size
        h = S * rng.uniform(0.07, 0.1)
        w = 2 * h
        row = np.floor(self._yy / h).astype(np.int64)
        shifted = self._xx + np.mod(row, 2) * w / 2
        col = np.floor(shifted / w).astype(np.int64)
        jitter = rng.normal(0, 0.08, (row.max() + 1, col.max() + 1)).astype(np.float32)
        brick = _hsv(rng.uniform(0.0, 0.08), rng.uniform(0.35, 0.6), rng.uniform(0.45, 0.7))
        img = brick * (1 + jitter[row, col] + 0.15 * (self._fine(rng) - 0.5))[..., None]
        m = max(1.0, 0.12 * h)
        mortar = (np.mod(self._yy, h) < m) | (np.mod(shifted, w) < m)
        img[mortar] = _hsv(0.1, 0.08, rng.uniform(0.72, 0.82))
        return img

    def _sand(self, rng: np.random.Generator) -> np.ndarray:
        base = _hsv(rng.uniform(0.09, 0.14), rng.uniform(0.25, 0.45), rng.uniform(0.7, 0.85))
        phi = rng.uniform(0, np.pi)
        wavelength = self.size * rng.uniform(0.08, 0.14)
        along = self._xx * np.cos(phi) + self._yy * np.sin(phi)
        ripple = np.sin(2 * np.pi * (along / wavelength + 0.8 * self._noise(rng, (3, 3))))
        return base * (1 + 0.08 * ripple + 0.12 * (self._fine(rng) - 0.5))[..., None]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shift(a: np.ndarray, dy: int, dx: int, fill: int | bool) -> np.ndarray:
    """``a`` moved by (dy, dx) pixels, the uncovered border filled with ``fill``."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _touches(a: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with a True pixel of ``a`` within ``radius`` (square neighbourhood, itself excluded)."""
    out = np.zeros(a.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy or dx:
                out |= _shift(a, dy, dx, False)
    return out


def _boundary_band(instance: np.ndarray, radius: int) -> np.ndarray:
    """VOC-style void band: pixels (background or a lower object) touching a later-painted object.

    The band lies outside each object's outline, so an unoccluded object's mask is exactly what was drawn;
    only where objects overlap does the lower one lose a pixel-wide strip along the upper one's edge.
    """
    band = np.zeros(instance.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy or dx:
                band |= _shift(instance, dy, dx, 0) > instance
    return band


def _fits(new: np.ndarray, shapes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bool:
    """Accept a new object if it hides ≤ 20% of any earlier object and ≤ 10% of its part."""
    for body, part, _ in shapes:
        obj = body | part
        if (new & obj).sum() > 0.2 * min(obj.sum(), new.sum()) or (new & part).sum() > 0.1 * part.sum():
            return False
    return True


# ------------------------------------------------------------------------------------------- on disk
def toy_params(
    seed: int = 0, size: int = 128, n_train_aug: int = 1000, n_train: int = 200, n_val: int = 200
) -> dict[str, int]:
    """The parameters a toy world on disk is keyed by (checked against ``toy.json`` before reuse)."""
    params = {
        "version": TOY_VERSION,
        "seed": int(seed),
        "size": int(size),
        "n_train_aug": int(n_train_aug),
        "n_train": int(n_train),
        "n_val": int(n_val),
    }
    if not 0 < params["n_train"] <= params["n_train_aug"] or params["n_val"] <= 0:
        raise ToyError(f"toy sizes need 0 < n_train <= n_train_aug and n_val > 0, got {params}")
    return params


def read_toy_meta(root: str | os.PathLike) -> dict | None:
    """Contents of ``<root>/toy.json`` (None when absent)."""
    path = Path(root) / TOY_META
    return json.loads(path.read_text()) if path.is_file() else None


def generate_toy(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    size: int = 128,
    n_train_aug: int = 1000,
    n_train: int = 200,
    n_val: int = 200,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the toy world into ``root`` unless the same world is already there; return ``root``.

    The world is written into a hidden sibling folder and renamed onto ``root``, so concurrent callers (DDP
    ranks, several jobs) never see a half-written world: the first rename wins and the others discard
    theirs. An existing ``root`` with other parameters is an error unless ``overwrite``.
    """
    root = Path(root).expanduser()
    params = toy_params(seed, size, n_train_aug, n_train, n_val)
    if root.exists() and not overwrite:
        _check_existing(root, params)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_world(staging, params, progress)
        if overwrite and root.exists():
            trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(root, trash)
            shutil.rmtree(trash)
        try:
            os.rename(staging, root)
        except OSError:
            if not root.exists():
                raise
            _check_existing(root, params)  # another process finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _check_existing(root: Path, params: dict[str, int]) -> None:
    meta = read_toy_meta(root)
    if meta is None:
        raise ToyError(
            f"{root} exists but has no toy.json: it is not a toy world; point data.root (or --root) elsewhere or delete it"
        )
    if meta["params"] != params:
        raise ToyError(
            f"{root}/toy.json was generated with {meta['params']}, not {params}: delete {root}, "
            "point data.root (or --root) elsewhere, or regenerate with `clims-data toy --root ... --force`"
        )


def _write_world(out: Path, params: dict[str, int], progress: bool) -> None:
    world = ToyWorld(params["size"], params["seed"])
    n_aug, n_val = params["n_train_aug"], params["n_val"]
    ids = [f"toy_{i:06d}" for i in range(n_aug + n_val)]
    train_aug, val = ids[:n_aug], ids[n_aug:]
    train = train_aug[: params["n_train"]]
    with_class_mask = set(train) | set(val)
    folders = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation")
    for folder in (*folders, BACKGROUND_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    backgrounds = {}
    for index, image_id in enumerate(tqdm(ids, desc="toy world", disable=not progress)):
        scene = world.scene(index)
        Image.fromarray(scene.rgb).save(out / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (out / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, scene))
        png = _palette_png(scene.mask)
        (out / "SegmentationClassAug" / f"{image_id}.png").write_bytes(png)
        if image_id in with_class_mask:
            (out / "SegmentationClass" / f"{image_id}.png").write_bytes(png)
            Image.fromarray(scene.background).save(out / BACKGROUND_DIR / f"{image_id}.png")
        backgrounds[image_id] = list(scene.backgrounds)
    lists = {"train": train, "val": val, "trainval": train + val, "train_aug": train_aug}
    for name, split_ids in lists.items():
        (out / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    meta = {
        "generator": "clims_pl.data.toy",
        "params": params,
        "classes": list(TOY_CLASSES),
        "cooccurring": TOY_COOCCURRING,
        "backgrounds": backgrounds,
    }
    (out / TOY_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _palette_png(mask: np.ndarray) -> bytes:
    img = Image.fromarray(mask)
    img.putpalette(VOC_PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _annotation_xml(image_id: str, scene: Scene) -> str:
    """VOC-style annotation: one ``<object>`` per painted object with its visible box (1-based, inclusive)."""
    h, w = scene.mask.shape
    objects = []
    for cls, (x0, y0, x1, y1) in zip(scene.class_indices, scene.boxes, strict=True):
        objects.append(
            "\t<object>\n"
            f"\t\t<name>{escape(TOY_CLASSES[cls])}</name>\n"
            "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
            f"\t\t<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>\n"
            "\t</object>\n"
        )
    return (
        "<annotation>\n\t<folder>VOC2012</folder>\n"
        f"\t<filename>{image_id}.jpg</filename>\n"
        "\t<source><database>clims-pl toy world</database></source>\n"
        f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
        "\t<segmented>1</segmented>\n" + "".join(objects) + "</annotation>\n"
    )
