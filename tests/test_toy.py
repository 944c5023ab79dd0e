"""Toy world: deterministic, exact VOC layout, masks agree with XML, co-occurring backgrounds, rendering API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clims_pl.data import toy
from clims_pl.data.cli import main
from clims_pl.data.toy import (
    NEUTRAL_RGB,
    P_COOCCUR,
    TOY_BACKGROUNDS,
    TOY_CLASSES,
    TOY_COOCCURRING,
    TOY_NEUTRAL,
    ToyError,
    ToyWorld,
    generate_toy,
)
from clims_pl.data.voc import image_labels, load_mask, read_split, validate_voc_root

SMALL = {"size": 64, "n_train_aug": 30, "n_train": 10, "n_val": 10}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dilate(a: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(a, r)
    out = np.zeros_like(a)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= padded[r + dy : r + dy + a.shape[0], r + dx : r + dx + a.shape[1]]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_toy(tmp_path_factory.mktemp("toy") / "toy", seed=0, progress=False, **SMALL)


def test_same_seed_gives_identical_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = _files(generate_toy(tmp_path / "again", seed=0, progress=False, **SMALL))
    assert again == _files(world)
    other = _files(generate_toy(tmp_path / "other", seed=1, progress=False, **SMALL))
    assert other.keys() == again.keys()
    jpegs = [name for name in again if name.endswith(".jpg")]
    assert sum(other[name] != again[name] for name in jpegs) == len(jpegs)


def test_voc_layout_and_splits(world: Path) -> None:
    validate_voc_root(world, need_aug=True)
    train, val, train_aug = (read_split(world, s) for s in ("train", "val", "train_aug"))
    assert (len(train), len(val), len(train_aug)) == (10, 10, 30)
    assert set(train) <= set(train_aug) and not set(val) & set(train_aug)
    # The derived train_aug (SBD folder ∪ train − val) equals the list the generator wrote.
    assert train_aug == (world / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    class_masks = {p.stem for p in (world / "SegmentationClass").glob("*.png")}
    assert class_masks == set(train) | set(val)  # like VOC: class masks only for train and val
    for image_id in train:
        np.testing.assert_array_equal(load_mask(world, image_id), load_mask(world, image_id, aug=True))
        with Image.open(world / "JPEGImages" / f"{image_id}.jpg") as img:
            assert img.size == (64, 64) and img.mode == "RGB"
        with Image.open(world / "SegmentationClass" / f"{image_id}.png") as img:
            assert img.mode == "P"


def test_masks_agree_with_xml_labels_and_boundaries_are_thin(world: Path) -> None:
    ids = read_split(world, "train_aug") + read_split(world, "val")
    labels = image_labels(world, ids, TOY_CLASSES, None)
    assert labels.sum(1).min() >= 1
    for image_id, label in zip(ids, labels, strict=True):
        mask = load_mask(world, image_id, aug=True)
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present == {int(c) + 1 for c in np.flatnonzero(label)}, image_id
        # A thin band: every 255 pixel is within 2 px of an object pixel (1 px, or 2 where three objects
        # overlap), and background pixels next to objects are 255.
        obj = (mask > 0) & (mask < 255)
        band = mask == 255
        assert band.any() and _dilate(obj, 2)[band].all(), image_id
        assert not (_dilate(obj, 1) & (mask == 0)).any(), image_id


def test_cooccurring_background_rate(tmp_path: Path) -> None:
    root = generate_toy(tmp_path / "big", seed=3, size=48, n_train_aug=240, n_train=10, n_val=10, progress=False)
    meta = json.loads((root / "toy.json").read_text())
    ids = read_split(root, "train_aug")
    labels = image_labels(root, ids, TOY_CLASSES, None)
    for c, name in enumerate(TOY_CLASSES):
        with_class = [image_id for image_id, row in zip(ids, labels, strict=True) if row[c]]
        rate = np.mean([TOY_COOCCURRING[name] in meta["backgrounds"][i] for i in with_class])
        assert len(with_class) >= 40 and abs(rate - P_COOCCUR) < 0.1, (name, rate)
    neutral = np.mean([bool(set(meta["backgrounds"][i]) & set(TOY_NEUTRAL)) for i in ids])
    assert 0.1 < neutral < 0.5
    assert max(len(meta["backgrounds"][i]) for i in ids) == 2


def test_parts_are_small_patterns_halve_bodies_and_colour_is_shared() -> None:
    world = ToyWorld(128, seed=0)
    rng = np.random.default_rng(0)
    fractions = {name: [] for name in TOY_CLASSES}
    dark_fractions = {name: [] for name in TOY_CLASSES}
    hues = {name: [] for name in TOY_CLASSES}
    for _ in range(40):
        for c, name in enumerate(TOY_CLASSES):
            pose = world._sample_pose(rng, 1.0, centre=True)
            body, part, dark = world._shape(c, pose)
            fractions[name].append(part.sum() / (body | part).sum())
            dark_fractions[name].append(dark.sum() / body.sum())
            rgb, alpha = world.render_object(name, rng)
            hues[name].append(rgb[alpha].astype(float).mean(0))
    for name in TOY_CLASSES:
        assert 0.03 < np.mean(fractions[name]) < 0.25, name  # a small discriminative part on a big body
        assert 0.4 < np.mean(dark_fractions[name]) < 0.6, name  # every pattern darkens about half the body
    means = np.array([np.mean(hues[name], 0) for name in TOY_CLASSES])
    assert np.ptp(means, axis=0).max() < 25  # mean object colour does not give the class away


def test_render_api() -> None:
    world = ToyWorld(96, seed=0)
    rng = np.random.default_rng(5)
    for name in TOY_CLASSES:
        rgb, alpha = world.render_object(name, rng)
        assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8 and alpha.dtype == bool
        assert 0.02 < alpha.mean() < 0.4
        assert (rgb[~alpha] == NEUTRAL_RGB).all()
    for name in TOY_BACKGROUNDS:
        bg = world.render_background(name, rng)
        assert bg.shape == (96, 96, 3) and bg.dtype == np.uint8 and bg.std() > 3  # a texture, not flat
    scene = world.render_scene(rng)
    assert scene.rgb.shape == (96, 96, 3) and scene.mask.shape == (96, 96)
    assert 1 <= len(scene.class_indices) <= 3 and len(scene.boxes) == len(scene.class_indices)
    assert set(scene.backgrounds) <= set(TOY_BACKGROUNDS)
    np.testing.assert_array_equal(world.scene(7).rgb, ToyWorld(96, seed=0).scene(7).rgb)
    with pytest.raises(ToyError, match="unknown toy class 'dog'"):
        world.render_object("dog", rng)
    with pytest.raises(ToyError, match="unknown toy background"):
        world.render_background("lava", rng)


def test_existing_root_is_reused_or_refused(world: Path, tmp_path: Path) -> None:
    stamp = (world / "toy.json").stat().st_mtime_ns
    assert generate_toy(world, seed=0, progress=False, **SMALL) == world
    assert (world / "toy.json").stat().st_mtime_ns == stamp  # same parameters: left alone
    with pytest.raises(
        ToyError, match=r"was generated with .*'seed': 0.*delete.*point data\.root \(or --root\) elsewhere"
    ):
        generate_toy(world, seed=1, progress=False, **SMALL)
    (tmp_path / "other").mkdir()
    with pytest.raises(ToyError, match=r"no toy\.json: .*point data\.root \(or --root\) elsewhere"):
        generate_toy(tmp_path / "other", progress=False, **SMALL)
    with pytest.raises(ToyError, match="n_train <= n_train_aug"):
        toy.toy_params(n_train=50, n_train_aug=10)


def test_cli_generates_and_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "toy",
        "--root",
        str(tmp_path / "t"),
        "--size",
        "48",
        "--n-train-aug",
        "6",
        "--n-train",
        "2",
        "--n-val",
        "2",
    ]
    assert main(args) == 0
    assert "train_aug       6 ids" in capsys.readouterr().out
    assert main([*args, "--seed", "4"]) == 1
    assert "was generated with" in capsys.readouterr().err
    assert main([*args, "--seed", "4", "--force"]) == 0
    assert json.loads((tmp_path / "t" / "toy.json").read_text())["params"]["seed"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_background_map_matches_backgrounds_and_is_written_for_evaluated_images(tmp_path) -> None:
    from PIL import Image

    from clims_pl.data.toy import BACKGROUND_DIR, TOY_BACKGROUNDS, ToyWorld, generate_toy

    world = ToyWorld(64, seed=3)
    for i in range(12):
        scene = world.scene(i)
        names = {TOY_BACKGROUNDS[k] for k in np.unique(scene.background)}
        assert names == set(scene.backgrounds)
    root = tmp_path / "toy"
    generate_toy(root, seed=3, size=64, n_train_aug=6, n_train=2, n_val=2)
    written = sorted(p.stem for p in (root / BACKGROUND_DIR).glob("*.png"))
    assert written == ["toy_000000", "toy_000001", "toy_000006", "toy_000007"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / BACKGROUND_DIR / "toy_000001.png")), world.scene(1).background
    )
