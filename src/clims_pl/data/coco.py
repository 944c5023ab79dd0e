"""MS-COCO 2014 on disk: the reference's second benchmark (its ``mscoco/dataloader.py`` and ``step_coco/``).

Layout (``data.root``)::

    train2014/COCO_train2014_000000000009.jpg ...     val2014/...
    annotations/instances_{train,val}2014.json
    mask/{train,val}2014/<numeric image id>.png       (written by ``clims-data coco-masks``)

* Image ids are the file names without extension (``COCO_train2014_000000000009``), as the reference names them;
  the id names its folder, so :func:`clims_pl.data.voc.load_image` and :func:`clims_pl.evaluate.ground_truth`
  read COCO files for COCO ids and every stage runs unchanged.
* A split is an image folder (``train2014``), optionally limited to its first N images (``train2014:10000``:
  the reference's ``COCOClassificationDatasetMSF`` keeps ``coco.ids[:10000]``). Order is torchvision
  ``CocoDetection``'s: sorted numeric ids.
* Labels: every annotation of the image, crowd ones included (``CocoDetection`` returns all of them), gives its
  class; classes are matched to ``data.classes`` by the category *name*, so channel order is the config's.
* Masks: background 0; each non-crowd annotation painted with its channel index + 1 in file order (later ones
  overwrite earlier ones), polygons and RLE decoded by pycocotools.

pycocotools is an optional dependency (``pip install 'clims-pl[coco]'``), imported only when COCO is used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clims_pl.data.imageio import decode_image, save_label_png
from clims_pl.io import atomic_write_json, cached_npz

#: The 80 COCO category names in category-id order (= channel order, the reference's ``category_map`` 1..80).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
#: Their sparse category ids in instances_*.json (the keys of the reference's ``category_map``).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)  # fmt: skip

_ID = re.compile(r"COCO_([a-z]+\d{4})_(\d+)")
_GET = (
    "download train2014.zip, val2014.zip and annotations_trainval2014.zip from https://cocodataset.org/#download "
    "(images.cocodataset.org/zips/, images.cocodataset.org/annotations/) and unzip them into the root"
)


class COCORootError(ValueError):
    """A COCO root or split that cannot be used; the message names the path and what to do."""


def is_coco_id(image_id: str) -> bool:
    """Whether ``image_id`` is a COCO file name (``COCO_train2014_000000000009``)."""
    return _ID.fullmatch(image_id) is not None


def is_coco_root(root: str | os.PathLike) -> bool:
    """A root holding ``annotations/instances_*.json`` (the COCO layout) rather than VOC's folders."""
    return any((Path(root).expanduser() / "annotations").glob("instances_*.json"))


def _parts(image_id: str) -> tuple[str, int]:
    match = _ID.fullmatch(image_id)
    if match is None:
        raise COCORootError(f"{image_id!r} is not a COCO image id (COCO_<split>_<12-digit number>)")
    return match.group(1), int(match.group(2))


def load_coco_image(root: str | os.PathLike, image_id: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``<split>/<id>.jpg`` (grey-level COCO images are converted to RGB)."""
    folder, _ = _parts(image_id)
    return decode_image(Path(root).expanduser() / folder / f"{image_id}.jpg", image_id)


def coco_mask_path(root: str | os.PathLike, image_id: str) -> Path:
    """``mask/<split>/<numeric id>.png``, where the reference reads the ground truth (``get_label_by_name``)."""
    folder, number = _parts(image_id)
    return Path(root).expanduser() / "mask" / folder / f"{number}.png"


def load_coco_mask(root: str | os.PathLike, image_id: str) -> np.ndarray:
    """(H, W) uint8 ground truth of ``image_id`` (0 background, 1..80), with the command that writes it."""
    path = coco_mask_path(root, image_id)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no ground-truth mask for {image_id}; write them with "
            f"`clims-data coco-masks --root {Path(root).expanduser()} --split {_parts(image_id)[0]}`"
        )
    return decode_image(path, image_id, index=True)


def parse_split(split: str) -> tuple[str, int | None]:
    """``train2014`` → (train2014, None); ``train2014:10000`` → (train2014, 10000) = its first 10,000 images."""
    name, _, limit = str(split).partition(":")
    if not re.fullmatch(r"[a-z]+\d{4}", name) or (limit and not limit.isdigit()) or limit == "0":
        raise COCORootError(
            f"COCO split {split!r} is invalid: use an image folder such as train2014 or val2014, optionally with "
            "':N' for its first N images (train2014:10000)"
        )
    return name, int(limit) if limit else None


def annotation_file(root: str | os.PathLike, split: str) -> Path:
    """``annotations/instances_<split>.json`` of a split, checked to exist with its image folder."""
    root = Path(root).expanduser()
    name, _ = parse_split(split)
    path = root / "annotations" / f"instances_{name}.json"
    missing = [str(p) for p in (path, root / name) if not p.exists()]
    if missing:
        raise COCORootError(f"COCO root {root} lacks {' and '.join(missing)} (split {split!r}): {_GET}")
    return path


def _pycocotools() -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise ImportError("COCO support needs pycocotools: pip install 'clims-pl[coco]'") from err
    return COCO


@functools.lru_cache(maxsize=2)
def _load_api(path: str, stamp: tuple[int, int]) -> Any:
    """The parsed instances file; ``stamp`` (size, mtime) makes a rewritten file parse again."""
    del stamp
    return _pycocotools()(path)


def coco_api(root: str | os.PathLike, split: str) -> Any:
    """pycocotools ``COCO`` of a split's instances file, parsed once per process."""
    path = annotation_file(root, split)
    stat = path.stat()
    return _load_api(str(path), (stat.st_size, stat.st_mtime_ns))


def _numeric_ids(api: Any, split: str) -> list[int]:
    """Sorted image ids (CocoDetection's order), cut to the split's limit."""
    _, limit = parse_split(split)
    return sorted(api.imgs)[:limit]


def split_ids(root: str | os.PathLike, split: str) -> list[str]:
    """Image ids (file names without extension) of a split, in the reference's order."""
    api = coco_api(root, split)
    return [Path(api.imgs[i]["file_name"]).stem for i in _numeric_ids(api, split)]


def category_channels(api: Any, classes: Sequence[str], source: str) -> dict[int, int]:
    """COCO category id → channel index, matched by name; every category and every class must be matched."""
    names = {int(c["id"]): str(c["name"]) for c in api.loadCats(api.getCatIds())}
    unknown = sorted(set(names.values()) - set(classes))
    absent = [c for c in classes if c not in names.values()]
    if unknown or absent:
        raise COCORootError(
            f"{source}: categories {unknown} are not in data.classes and data.classes {absent} are not categories "
            "of the file; list the file's category names (conf/data/coco.yaml has the 80 of COCO 2014)"
        )
    return {cat: list(classes).index(name) for cat, name in names.items()}


def coco_labels(
    root: str | os.PathLike, split: str, classes: Sequence[str], cache_dir: str | os.PathLike | None
) -> tuple[list[str], np.ndarray]:
    """(ids, (N, C) float32 multi-hot labels) of a split, cached in ``cache_dir`` (None: no cache).

    The cache name hashes the instances file (path, size, mtime), the split and the classes, so a changed
    file or class list recomputes instead of reusing stale labels.
    """
    path = annotation_file(root, split)
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, split, list(classes)])

    def build() -> dict[str, np.ndarray]:
        api = coco_api(root, split)
        channel = category_channels(api, classes, str(path))
        numeric = _numeric_ids(api, split)
        labels = np.zeros((len(numeric), len(classes)), dtype=np.float32)
        for row, image in enumerate(numeric):
            for ann in api.imgToAnns.get(image, []):
                labels[row, channel[int(ann["category_id"])]] = 1.0
        return {"ids": np.array([Path(api.imgs[i]["file_name"]).stem for i in numeric]), "labels": labels}

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"coco-labels-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    return cached_npz(cache, lambda data: ([str(i) for i in data["ids"]], data["labels"]), build)


def semantic_mask(api: Any, image: int, channel: dict[int, int]) -> np.ndarray:
    """(H, W) uint8 mask of one image: non-crowd annotations in file order, channel index + 1, background 0."""
    info = api.imgs[image]
    mask = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
    for ann in api.imgToAnns.get(image, []):
        if not ann.get("iscrowd", 0):
            mask[api.annToMask(ann) > 0] = channel[int(ann["category_id"])] + 1
    return mask


def write_coco_masks(
    root: str | os.PathLike,
    split: str,
    classes: Sequence[str] = COCO_CLASSES,
    num_threads: int = 8,
    progress: bool = True,
) -> Path:
    """Write ``mask/<split>/<numeric id>.png`` for every image of ``split``; return the folder.

    Resumable: existing PNGs (written atomically, so complete) are kept. ``mask/<split>.json`` records the
    instances file and classes they were made from; a different record is an error, so masks of another
    annotation file are never silently mixed.
    """
    path = annotation_file(root, split)
    name, _ = parse_split(split)
    out = Path(root).expanduser() / "mask" / name
    stat = path.stat()
    record = {"annotations": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "classes": list(classes)}
    stamp = out.parent / f"{name}.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != record:
        raise COCORootError(
            f"{stamp}: the masks in {out} were made from another instances file or class list; "
            f"delete {out} and {stamp} to rewrite them"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, record)
    api = coco_api(root, split)
    channel = category_channels(api, classes, str(path))
    todo = [i for i in _numeric_ids(api, split) if not (out / f"{i}.png").is_file()]

    def write(image: int) -> None:
        save_label_png(out / f"{image}.png", semantic_mask(api, image, channel))

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for _ in tqdm(pool.map(write, todo), total=len(todo), desc=f"masks {name}", disable=not progress):
            pass
    return out
