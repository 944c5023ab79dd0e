"""PASCAL VOC 2012 on disk: root validation, splits, image-level labels, images and palette masks (docs/reference.md#data).

Everything here works on the plain VOC2012 folder layout, so the procedural toy world (``toy.py``), written in
the same layout, runs through exactly the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clims_pl.data.imageio import decode_image
from clims_pl.io import cached_npz

#: Channel order everywhere; segmentation label = index + 1, 0 = background (docs/reference.md#image-level-labels).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


_REQUIRED = ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass")
_AUG = "SegmentationClassAug"


class VOCRootError(ValueError):
    """A VOC root lacks something; the message is one line naming what is missing and how to get it."""


def validate_voc_root(root: str | os.PathLike, *, need_aug: bool = False) -> Path:
    """Check that ``root`` has the VOC2012 folders (and SBD's SegmentationClassAug when ``need_aug``).

    Raises VOCRootError naming every missing folder at once, so a half-extracted download is diagnosed in
    one go rather than one folder per run.
    """
    root = Path(root).expanduser()
    get = f"get it with `clims-data download voc --root {root}`"
    if not root.is_dir():
        raise VOCRootError(
            f"VOC root {root} does not exist: {get} (or point data.root at the folder holding JPEGImages/)"
        )
    missing = [name for name in _REQUIRED if not (root / name).is_dir()]
    if need_aug and not (root / _AUG).is_dir():
        missing.append(_AUG)
    if missing:
        what = ", ".join(f"{name}/" for name in missing)
        hint = " (SegmentationClassAug/ comes from the SBD masks)" if missing == [_AUG] else ""
        raise VOCRootError(f"VOC root {root} is missing {what}{hint}: {get}")
    return root


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    """Image ids of a split.

    ``train``/``val``/``test`` (or any other ``ImageSets/Segmentation/<split>.txt``) are read as listed.
    ``train_aug`` is derived, not shipped: (ids having ``SegmentationClassAug/<id>.png`` ∪ train) − val, sorted;
    on VOC2012 + SBD this gives the reference's 10,582 ids (docs/reference.md#image-lists). On a COCO root the split is an image folder
    (``train2014``, ``train2014:10000``) read from its instances file (``coco.split_ids``).
    """
    from clims_pl.data import coco

    if coco.is_coco_root(root):
        return coco.split_ids(root, split)
    root = validate_voc_root(root, need_aug=split == "train_aug")
    if split == "train_aug":
        aug = {p.stem for p in (root / _AUG).glob("*.png")}
        val = set(read_split(root, "val"))
        return sorted((aug | set(read_split(root, "train"))) - val)
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        have = [*sorted(p.stem for p in path.parent.glob("*.txt")), "train_aug"]
        raise VOCRootError(f"split list {path} not found: use one of {', '.join(have)}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


#: Size of train_aug on the standard VOC2012 + SBD data (the reference's list); data.expected_train_aug.
VOC_TRAIN_AUG_SIZE = 10582


def check_train_aug(root: str | os.PathLike, ids: Sequence[str], expected: int, *, strict: bool = False) -> None:
    """Compare the derived train_aug with its expected size (data.expected_train_aug); warn, or with ``strict`` raise.

    The message gives the counts train_aug is derived from, so an incomplete SBD extraction or another
    dataset version is recognisable before every number downstream silently changes.
    """
    if len(ids) == expected:
        return
    root = Path(root)
    n_aug = sum(1 for _ in (root / _AUG).glob("*.png"))
    n_train, n_val = len(read_split(root, "train")), len(read_split(root, "val"))
    message = (
        f"train_aug of {root} has {len(ids)} ids, data.expected_train_aug={expected}: it is derived from "
        f"{n_aug} {_AUG}/ masks ∪ {n_train} train ids − {n_val} val ids (standard VOC2012 + SBD: 12031 masks, "
        f"1464 train, 1449 val → {VOC_TRAIN_AUG_SIZE}); re-extract with `clims-data download voc --root {root}`, "
        "or set data.expected_train_aug=null for another dataset"
    )
    if strict:
        raise VOCRootError(f"{message} (data.strict=true)")
    warnings.warn(f"{message} (data.strict=true makes this an error)", stacklevel=2)


def _labels_cache_key(root: Path, ids: Sequence[str], classes: Sequence[str]) -> str:
    """Hash of everything the labels depend on; Annotations/'s inode+mtime catch a regenerated dataset."""
    ann = (root / "Annotations").stat()
    key = json.dumps(
        {
            "root": str(root.resolve()),
            "annotations": [ann.st_ino, ann.st_mtime_ns],
            "classes": list(classes),
            "ids": list(ids),
        }
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def parse_labels(xml_path: Path, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot (C,) float32 from one Annotations XML, and the names of its objects outside ``classes``.

    Every ``<name>`` element whose text is a class name counts, whatever its difficult/truncated flags, as in
    the reference's make_cls_labels (docs/reference.md#image-level-labels); other names (object parts, owners) are ignored. Objects
    (``<object><name>``) of another class are returned so that the caller can report them (VOC has none).
    """
    index = {name: i for i, name in enumerate(classes)}
    label = np.zeros(len(classes), dtype=np.float32)
    tree = ET.parse(xml_path).getroot()
    for node in tree.iter("name"):
        i = index.get((node.text or "").strip())
        if i is not None:
            label[i] = 1.0
    unknown = [name for node in tree.iterfind("object/name") if (name := (node.text or "").strip()) not in index]
    return label, unknown


def _report_unknown_objects(root: Path, unknown: dict[str, list[str]], *, strict: bool) -> None:
    """Warn (or with ``strict`` raise) about objects whose class is not in data.classes: they get no label.

    ``unknown`` maps each such name to the XML files naming it (once per object).
    """
    if not unknown:
        return

    def files(names: list[str]) -> str:
        unique = sorted(set(names))
        more = f" and {len(unique) - 10} more" if len(unique) > 10 else ""
        return ", ".join(unique[:10]) + more

    detail = "; ".join(f"{name} ×{len(xmls)} in {files(xmls)}" for name, xmls in sorted(unknown.items()))
    total = sum(len(xmls) for xmls in unknown.values())
    message = (
        f"{root / 'Annotations'}: {total} object(s) have a class name not in data.classes and give no "
        f"image-level label: {detail}; add the class to data.classes (and the prompt bank) if it is one"
    )
    if strict:
        raise VOCRootError(f"{message}, or set data.strict=false to ignore such objects")
    warnings.warn(f"{message} (data.strict=true makes this an error)", stacklevel=3)


def image_labels(
    root: str | os.PathLike,
    ids: Sequence[str],
    classes: Sequence[str],
    cache_dir: str | os.PathLike | None,
    *,
    strict: bool = False,
) -> np.ndarray:
    """(len(ids), C) float32 multi-hot labels from ``Annotations/<id>.xml``, cached in ``cache_dir``.

    Objects whose class is not in ``classes`` give no label and are reported on every call (cached too): a
    warning with the counts and files, or with ``strict`` (data.strict) a VOCRootError.

    The cache never lives inside the dataset root (which may be read-only or shared) and its name hashes the
    root, its Annotations folder, the class list and the id list, so any change recomputes. ``cache_dir=None``
    disables caching.
    """
    root = validate_voc_root(root)
    ids, classes = list(ids), list(classes)

    def read(data: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, list[str]]]:
        labels = data["labels"]
        if labels.shape != (len(ids), len(classes)):
            raise ValueError(f"cached labels of shape {labels.shape}")
        return labels, json.loads(str(data["unknown"]))

    def build() -> dict[str, np.ndarray]:
        labels = np.zeros((len(ids), len(classes)), dtype=np.float32)
        unknown: dict[str, list[str]] = {}
        for row, image_id in enumerate(ids):
            xml_path = root / "Annotations" / f"{image_id}.xml"
            if not xml_path.is_file():
                raise VOCRootError(
                    f"{xml_path} not found: the split lists an id the dataset lacks; "
                    f"re-extract with `clims-data download voc --root {root}`"
                )
            labels[row], names = parse_labels(xml_path, classes)
            for name in names:
                unknown.setdefault(name, []).append(xml_path.name)
        return {"labels": labels, "unknown": np.array(json.dumps(unknown))}

    cache = None if cache_dir is None else Path(cache_dir) / f"labels-{_labels_cache_key(root, ids, classes)}.npz"
    labels, unknown = cached_npz(cache, read, build)
    _report_unknown_objects(root, unknown, strict=strict)
    return labels


def load_image(root: str | os.PathLike, image_id: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``JPEGImages/<id>.jpg`` (a COCO id: ``<split>/<id>.jpg``, see ``data/coco.py``)."""
    from clims_pl.data import coco

    if coco.is_coco_id(image_id):
        return coco.load_coco_image(root, image_id)
    return decode_image(Path(root) / "JPEGImages" / f"{image_id}.jpg", image_id)


def load_mask(root: str | os.PathLike, image_id: str, aug: bool = False) -> np.ndarray:
    """(H, W) uint8 class indices (0 background, 1..C objects, 255 ignore).

    ``aug=False`` reads VOC's ``SegmentationClass`` (palette PNGs with 255 boundaries), ``aug=True`` SBD's
    ``SegmentationClassAug`` (grey-level PNGs); both decode to indices.
    """
    return decode_image(Path(root) / (_AUG if aug else "SegmentationClass") / f"{image_id}.png", image_id, index=True)
