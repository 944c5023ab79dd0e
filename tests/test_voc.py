"""VOC layer on a hand-made root: labels from XML (docs/reference.md#image-level-labels), train_aug arithmetic (docs/reference.md#image-lists), root errors, PNG I/O."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clims_pl.data import voc
from clims_pl.data.imageio import VOC_PALETTE, save_label_png
from clims_pl.data.voc import (
    VOC_CLASSES,
    VOCRootError,
    image_labels,
    load_image,
    load_mask,
    read_split,
    validate_voc_root,
)


def _xml(*objects: tuple[str, dict[str, str]], extra: str = "") -> str:
    body = "".join(
        f"<object><name>{name}</name>" + "".join(f"<{k}>{v}</{k}>" for k, v in flags.items()) + "</object>"
        for name, flags in objects
    )
    return f"<annotation><filename>x.jpg</filename>{extra}{body}</annotation>"


# Image 1: a difficult dog, two persons (one truncated) with a <part><name>head</name>, an owner called "Bob".
# Image 2: a cat and an object outside the class list. Image 3: aeroplane, bicycle, aeroplane again.
XMLS = {
    "2007_000001": _xml(
        ("dog", {"difficult": "1"}),
        ("person", {"truncated": "1", "part": "<name>head</name>"}),
        ("person", {}),
        extra="<owner><name>Bob</name></owner>",
    ),
    "2007_000002": _xml(("cat", {}), ("tree", {})),
    "2007_000003": _xml(("aeroplane", {}), ("bicycle", {"difficult": "1"}), ("aeroplane", {})),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass"):
        (root / folder).mkdir(parents=True)
    for image_id, xml in XMLS.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        Image.fromarray(np.full((50, 75, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000003\n\n")
    return root


def test_labels_from_xml_count_every_object(voc_root: Path, tmp_path: Path) -> None:
    ids = list(XMLS)
    with pytest.warns(
        UserWarning, match=r"1 object\(s\) have a class name not in data\.classes.*tree ×1 in 2007_000002"
    ):
        labels = image_labels(voc_root, ids, VOC_CLASSES, tmp_path / "cache")
    assert labels.dtype == np.float32 and labels.shape == (3, 20)
    expected = np.zeros((3, 20), np.float32)
    expected[0, [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]] = 1  # difficult and truncated count
    expected[1, VOC_CLASSES.index("cat")] = 1  # "tree" ignored
    expected[2, [0, 1]] = 1  # repeated aeroplane is still a single 1
    np.testing.assert_array_equal(labels, expected)
    # A different class list gives its own channel order and its own cache entry.
    with pytest.warns(UserWarning, match="aeroplane ×2 in 2007_000003.xml; bicycle ×1"):
        subset = image_labels(voc_root, ids, ["person", "cat"], tmp_path / "cache")
    np.testing.assert_array_equal(subset, [[1, 0], [0, 1], [0, 0]])
    assert len(list((tmp_path / "cache").glob("labels-*.npz"))) == 2


@pytest.mark.filterwarnings("ignore:.*class name not in data.classes")  # the "tree" object of 2007_000002
def test_label_cache_is_reused_and_keyed(voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    ids = ["2007_000002", "2007_000003"]
    first = image_labels(voc_root, ids, VOC_CLASSES, cache)
    before = {p.name for p in voc_root.rglob("*")}

    def refuse(*args: object) -> None:
        raise AssertionError("XML parsed although the cache holds these labels")

    monkeypatch.setattr(voc, "parse_labels", refuse)
    np.testing.assert_array_equal(image_labels(voc_root, ids, VOC_CLASSES, cache), first)
    with pytest.raises(AssertionError, match="XML parsed"):  # another id list must not reuse that cache
        image_labels(voc_root, ids[:1], VOC_CLASSES, cache)
    monkeypatch.undo()
    assert {p.name for p in voc_root.rglob("*")} == before  # nothing written inside the dataset root

    # A rebuilt Annotations folder (new dataset at the same path) invalidates the cache.
    shutil.move(voc_root / "Annotations", tmp_path / "old")
    shutil.copytree(tmp_path / "old", voc_root / "Annotations")
    (voc_root / "Annotations" / "2007_000002.xml").write_text(_xml(("dog", {})))
    relabelled = image_labels(voc_root, ids, VOC_CLASSES, cache)
    assert relabelled[0, VOC_CLASSES.index("dog")] == 1 and relabelled[0, VOC_CLASSES.index("cat")] == 0


def test_missing_annotation_is_a_clear_error(voc_root: Path) -> None:
    with pytest.raises(VOCRootError, match=r"Annotations/2009_999999\.xml not found"):
        image_labels(voc_root, ["2009_999999"], VOC_CLASSES, None)


def test_train_aug_is_aug_union_train_minus_val(voc_root: Path) -> None:
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir()
    for image_id in ("2007_000002", "2007_000003", "2008_000005", "2008_000004"):
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(aug / f"{image_id}.png")
    (aug / "notes.txt").write_text("not a mask")
    assert read_split(voc_root, "train") == ["2007_000001", "2007_000002"]
    assert read_split(voc_root, "val") == ["2007_000003"]
    # ({2, 3, 2008_5, 2008_4} ∪ {1, 2}) − {3}, sorted
    assert read_split(voc_root, "train_aug") == ["2007_000001", "2007_000002", "2008_000004", "2008_000005"]


def test_train_aug_without_sbd_names_the_folder(voc_root: Path) -> None:
    with pytest.raises(VOCRootError, match=r"missing SegmentationClassAug/ .*SBD.*clims-data download voc --root"):
        read_split(voc_root, "train_aug")


def test_unknown_split_lists_the_available_ones(voc_root: Path) -> None:
    with pytest.raises(VOCRootError, match="use one of train, val, train_aug"):
        read_split(voc_root, "trainval")


def test_bad_root_errors_name_what_is_missing(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(VOCRootError, match=r"does not exist: get it with `clims-data download voc --root"):
        validate_voc_root(tmp_path / "nowhere")
    shutil.rmtree(voc_root / "Annotations")
    shutil.rmtree(voc_root / "SegmentationClass")
    with pytest.raises(VOCRootError) as err:
        validate_voc_root(voc_root)
    message = str(err.value)
    assert "missing Annotations/, SegmentationClass/:" in message and "\n" not in message
    assert f"clims-data download voc --root {voc_root}" in message
    assert "JPEGImages" not in message.split("missing")[1]


def test_label_png_round_trip_and_palette(tmp_path: Path) -> None:
    label = np.array([[0, 1, 15], [20, 255, 0]], np.uint8)
    save_label_png(tmp_path / "sub" / "a.png", label)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temp file left behind
    with Image.open(tmp_path / "sub" / "a.png") as img:
        assert img.mode == "P"
        palette = np.array(img.getpalette()[:768]).reshape(256, 3)
    np.testing.assert_array_equal(palette[[0, 1, 15, 255]], [[0, 0, 0], [128, 0, 0], [192, 128, 128], [224, 224, 192]])
    np.testing.assert_array_equal(VOC_PALETTE, palette)
    root = tmp_path / "root"
    (root / "SegmentationClass").mkdir(parents=True)
    save_label_png(root / "SegmentationClass" / "x.png", label)
    np.testing.assert_array_equal(load_mask(root, "x"), label)


def test_load_image_is_rgb_uint8(voc_root: Path) -> None:
    img = load_image(voc_root, "2007_000001")
    assert img.shape == (50, 75, 3) and img.dtype == np.uint8
