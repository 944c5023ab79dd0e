"""Bad data found before training: `clims-data check --deep`, loaders naming id and path, the train_aug count,
XML objects outside data.classes."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clims_pl.data.cli import main
from clims_pl.data.datamodule import ClassificationDataset, VOCDataModule
from clims_pl.data.imageio import ImageFileError
from clims_pl.data.segmentation import SegEvalDataset
from clims_pl.data.toy import TOY_CLASSES, generate_toy
from clims_pl.data.transforms import val_transform
from clims_pl.data.voc import VOCRootError, check_train_aug, image_labels, load_mask, read_split

TINY = {"seed": 0, "size": 32, "n_train_aug": 4, "n_train": 2, "n_val": 2}


@pytest.fixture
def broken_root(tmp_path: Path) -> Path:
    """A tiny toy world whose train image toy_000001 is missing and whose val image toy_000004 is truncated."""
    root = generate_toy(tmp_path / "toy", progress=False, **TINY)
    (root / "JPEGImages" / "toy_000001.jpg").unlink()
    jpeg = root / "JPEGImages" / "toy_000004.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) * 2 // 3])
    return root


def test_deep_check_names_every_bad_file_shallow_check_does_not_open_images(
    broken_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--root", str(broken_root)]) == 0  # shallow: folders, split lists and XMLs only
    assert "--deep" in capsys.readouterr().out
    assert main(["check", "--deep", "--root", str(broken_root)]) == 1
    err = capsys.readouterr().err
    bad = [line.strip() for line in err.splitlines() if line.strip().startswith("bad:")]
    assert bad == [
        f"bad: {broken_root}/JPEGImages/toy_000001.jpg: missing",
        f"bad: {broken_root}/JPEGImages/toy_000004.jpg: cannot decode (image file is truncated"
        + bad[1].split("image file is truncated", 1)[1],
    ]
    assert "2 bad file(s)" in err


def test_deep_check_flags_mask_values_sizes_and_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = generate_toy(tmp_path / "toy", progress=False, **TINY)
    assert main(["check", "--deep", "--root", str(root)]) == 0
    capsys.readouterr()
    Image.fromarray(np.full((32, 32), 9, np.uint8), mode="L").save(root / "SegmentationClass" / "toy_000000.png")
    Image.fromarray(np.zeros((16, 32), np.uint8), mode="L").save(root / "SegmentationClassAug" / "toy_000005.png")
    (root / "SegmentationClass" / "toy_000004.png").unlink()
    (root / "ImageSets/Segmentation/train.txt").write_text("toy_000000\ntoy_000001\ntoy_000001\n")
    assert main(["check", "--deep", "--root", str(root)]) == 1
    bad = sorted(line.strip()[5:] for line in capsys.readouterr().err.splitlines() if line.strip().startswith("bad:"))
    assert bad == sorted(
        [
            f"{root}/ImageSets/Segmentation/train.txt: id 'toy_000001' is listed more than once",
            f"{root}/SegmentationClass/toy_000000.png: values [9] outside 0..4 and 255",
            f"{root}/SegmentationClass/toy_000004.png: missing",
            f"{root}/SegmentationClassAug/toy_000005.png: size (16, 32) differs from the image's (32, 32)",
        ]
    )


def test_datasets_name_id_and_path_of_an_undecodable_image(broken_root: Path) -> None:
    labels = np.zeros((2, len(TOY_CLASSES)), np.float32)
    dataset = ClassificationDataset(broken_root, ["toy_000004", "toy_000001"], labels, val_transform(32))
    with pytest.raises(ImageFileError, match=r"image toy_000004: cannot decode .*toy_000004\.jpg.*truncated"):
        dataset[0]
    with pytest.raises(FileNotFoundError, match=r"image toy_000001: .*JPEGImages/toy_000001\.jpg not found"):
        dataset[1]
    with pytest.raises(ImageFileError, match=r"toy_000004.*JPEGImages/toy_000004\.jpg"):
        SegEvalDataset(broken_root, ["toy_000004"])[0]
    png = broken_root / "SegmentationClass" / "toy_000005.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ImageFileError, match=r"image toy_000005: cannot decode .*SegmentationClass/toy_000005\.png"):
        load_mask(broken_root, "toy_000005")


def _fake_voc(tmp_path: Path, n_aug: int) -> Path:
    """A VOC-layout root with n_aug SBD masks (a0..), train {a0, t0} and val {v0}: train_aug = n_aug + 1 ids."""
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass", "SegmentationClassAug"):
        (root / folder).mkdir(parents=True)
    for i in range(n_aug):
        (root / "SegmentationClassAug" / f"a{i}.png").touch()
    (root / "ImageSets/Segmentation/train.txt").write_text("a0\nt0\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("v0\n")
    return root


def test_train_aug_count_warns_with_its_sources_or_fails_when_strict(tmp_path: Path) -> None:
    root = _fake_voc(tmp_path, n_aug=3)
    ids = read_split(root, "train_aug")
    assert ids == ["a0", "a1", "a2", "t0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_train_aug(root, ids, 4)  # the expected count: silent
    with pytest.warns(
        UserWarning,
        match=r"has 4 ids, data\.expected_train_aug=10582.* 3 SegmentationClassAug/ masks "
        r"∪ 2 train ids − 1 val ids .*12031 masks, 1464 train, 1449 val",
    ):
        check_train_aug(root, ids, 10582)
    with pytest.raises(VOCRootError, match=r"has 4 ids, data\.expected_train_aug=10582.*data\.strict=true\)$"):
        check_train_aug(root, ids, 10582, strict=True)


def test_voc_datamodule_checks_train_aug_only_when_expected(tmp_path: Path) -> None:
    root = _fake_voc(tmp_path, n_aug=2)
    for image_id in ("a0", "a1", "t0"):
        (root / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><object><name>cat</name></object></annotation>"
        )
    common = {"root": root, "classes": ["cat"], "prompts": _bank(tmp_path), "label_cache_dir": None}
    with pytest.warns(UserWarning, match=r"has 3 ids, data\.expected_train_aug=10582"):
        VOCDataModule(**common, expected_train_aug=10582).split("train_aug")
    with pytest.raises(VOCRootError, match=r"has 3 ids, data\.expected_train_aug=10582"):
        VOCDataModule(**common, expected_train_aug=10582, strict=True).split("train_aug")
    ids, labels = VOCDataModule(**common, expected_train_aug=None, strict=True).split("train_aug")  # toy setting
    assert ids == ["a0", "a1", "t0"] and labels.tolist() == [[1.0], [1.0], [1.0]]


def _bank(tmp_path: Path) -> str:
    path = tmp_path / "cat.yaml"
    path.write_text("classes: [cat]\nbackground: [grass]\n")
    return str(path)


def test_objects_of_unknown_classes_are_reported_with_counts_and_files(tmp_path: Path) -> None:
    root = _fake_voc(tmp_path, n_aug=0)
    xmls = {
        "t1": "<object><name>cat</name><part><name>head</name></part></object><object><name>dgo</name></object>",
        "t2": "<object><name>dgo</name></object><object><name>dgo</name></object><object><name>tram</name></object>",
        "t3": "<owner><name>Bob</name></owner><object><name>cat</name></object>",
    }
    for image_id, body in xmls.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    ids = list(xmls)
    message = (
        r"4 object\(s\) have a class name not in data\.classes and give no image-level label: "
        r"dgo ×3 in t1\.xml, t2\.xml; tram ×1 in t2\.xml; add the class"
    )
    for cache in (tmp_path / "cache", tmp_path / "cache"):  # computed, then read from the cache: reported both times
        with pytest.warns(UserWarning, match=message):
            labels = image_labels(root, ids, ["cat"], cache)
        assert labels.tolist() == [[1.0], [0.0], [1.0]]
    with pytest.raises(VOCRootError, match=message + r".* set data\.strict=false"):
        image_labels(root, ids, ["cat"], tmp_path / "cache", strict=True)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(VOCRootError, match=message):
        image_labels(root, ids, ["cat"], tmp_path / "cache", strict=True)
