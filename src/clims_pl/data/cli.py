"""``clims-data``: get, generate and check datasets (argparse, not Hydra: these commands need no config).

clims-data download voc --root data/VOCdevkit/VOC2012     # VOC2012 trainval + SBD SegmentationClassAug
clims-data toy --root data/toy                             # the procedural toy world (seconds, offline)
clims-data check --root data/VOCdevkit/VOC2012             # validate a root and count its splits
clims-data check --deep --root data/VOCdevkit/VOC2012      # ... and decode every listed image and mask
clims-data coco-masks --root data/coco --split train2014    # COCO 2014 ground-truth PNGs (needs pycocotools)
clims-data check --root data/coco                          # a COCO root: split sizes and label statistics
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clims_pl.data import coco, download, toy
from clims_pl.data.imageio import ImageFileError, decode_image
from clims_pl.data.voc import (
    VOC_CLASSES,
    VOC_TRAIN_AUG_SIZE,
    VOCRootError,
    check_train_aug,
    image_labels,
    read_split,
    validate_voc_root,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clims-data",
        description="Get, generate and check the datasets of clims-pl (VOC layout; MS-COCO 2014 masks and checks).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dl = sub.add_parser(
        "download",
        help="download and unpack a dataset",
        description="Download PASCAL VOC 2012 trainval and the SBD augmented masks (SegmentationClassAug) into "
        "ROOT, resuming partial downloads and verifying checksums. ROOT becomes the folder holding JPEGImages/ "
        "(the same path as the data.root config key). Without internet, download the two archives elsewhere "
        "and pass them as file:// URLs.",
    )
    dl.add_argument("dataset", choices=["voc"], help="which dataset")
    dl.add_argument("--root", required=True, type=Path, help="target VOC2012 folder (data.root)")
    dl.add_argument("--voc-url", default=download.VOC_URL, help="VOC2012 trainval tar (http(s):// or file://)")
    dl.add_argument("--voc-md5", default=download.VOC_MD5, help="expected md5 of the VOC tar")
    dl.add_argument("--sbd-url", default=download.SBD_URL, help="SegmentationClassAug.zip (http(s):// or file://)")
    dl.add_argument(
        "--sbd-md5",
        default=download.SBD_MD5,
        help="expected md5 of the SBD zip (default: none published; the zip's CRCs are checked instead)",
    )
    dl.add_argument("--no-sbd", action="store_true", help="skip the SBD masks (no train_aug split)")
    dl.add_argument("--no-verify", action="store_true", help="skip md5 checks (mirrors with other archives)")
    dl.add_argument("--download-dir", type=Path, help="where archives are kept (default: ROOT/../downloads)")
    dl.add_argument("--delete-archives", action="store_true", help="delete the archives after unpacking")
    dl.add_argument("--force", action="store_true", help="unpack again even if ROOT already looks complete")
    dl.add_argument("--timeout", type=float, default=download.CONNECT_TIMEOUT, help="connect/read timeout in seconds")

    gen = sub.add_parser(
        "toy",
        help="generate the procedural toy world",
        description="Write the deterministic toy world (VOC layout; classes "
        f"{', '.join(toy.TOY_CLASSES)}) into ROOT. Same seed and sizes give byte-identical files.",
    )
    gen.add_argument("--root", required=True, type=Path, help="target folder (data.root of conf/data/toy.yaml)")
    gen.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    gen.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    gen.add_argument("--n-train-aug", type=int, default=1000, help="training images (default 1000)")
    gen.add_argument("--n-train", type=int, default=200, help="evaluation subset of train_aug (default 200)")
    gen.add_argument("--n-val", type=int, default=200, help="validation images (default 200)")
    gen.add_argument("--force", action="store_true", help="replace an existing world with other parameters")

    check = sub.add_parser(
        "check",
        help="validate a VOC-layout root and count its splits",
        description="Validate ROOT, print split sizes and label statistics (labels parsed from Annotations/, "
        "not cached). Without --deep only the folders, split lists and XMLs are read: a missing or corrupt "
        "image or mask passes. --deep also decodes every listed image and mask and checks ids, mask values "
        "(0..C or 255) and mask size = image size, then exits 1 naming every bad file.",
    )
    check.add_argument("--root", required=True, type=Path, help="a VOC2012 or toy root")
    check.add_argument("--deep", action="store_true", help="decode every listed image and mask (minutes on VOC)")

    masks = sub.add_parser(
        "coco-masks",
        help="write MS-COCO 2014 ground-truth masks from the instance annotations",
        description="Write ROOT/mask/SPLIT/<image id>.png from ROOT/annotations/instances_SPLIT.json with "
        "pycocotools: background 0, each non-crowd annotation painted with its class index 1..80 in file order. "
        "Resumable: existing PNGs are kept.",
    )
    masks.add_argument("--root", required=True, type=Path, help="COCO root holding train2014/, annotations/")
    masks.add_argument("--split", action="append", help="train2014 and/or val2014 (repeatable; default both)")
    masks.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    return parser


def _coco_masks(args: argparse.Namespace) -> None:
    for split in args.split or ["train2014", "val2014"]:
        print(f"masks written: {coco.write_coco_masks(args.root, split, num_threads=args.threads)}")


def _check_coco(root: Path) -> None:
    """Split sizes and label statistics of every instances file of a COCO root, and its mask coverage."""
    for path in sorted((root / "annotations").glob("instances_*.json")):
        split = path.stem.removeprefix("instances_")
        ids, labels = coco.coco_labels(root, split, coco.COCO_CLASSES, None)
        masks = sum(coco.coco_mask_path(root, i).is_file() for i in ids)
        per_image = labels.sum(1)
        print(
            f"  {split:<10} {len(ids):>6} ids; classes/image mean {per_image.mean():.3f} min {int(per_image.min())}; "
            f"{masks} ground-truth masks" + ("" if masks == len(ids) else f" (`clims-data coco-masks --split {split}`)")
        )


def _download(args: argparse.Namespace) -> None:
    root = download.download_voc(
        args.root,
        voc_url=args.voc_url,
        voc_md5=args.voc_md5,
        sbd_url=args.sbd_url,
        sbd_md5=args.sbd_md5,
        sbd=not args.no_sbd,
        verify=not args.no_verify,
        download_dir=args.download_dir,
        delete_archives=args.delete_archives,
        force=args.force,
        timeout=args.timeout,
    )
    print(f"VOC root ready: {root}")
    _check(root)


def _toy(args: argparse.Namespace) -> None:
    root = toy.generate_toy(
        args.root,
        seed=args.seed,
        size=args.size,
        n_train_aug=args.n_train_aug,
        n_train=args.n_train,
        n_val=args.n_val,
        overwrite=args.force,
    )
    print(f"toy world ready: {root}")
    _check(root)


def _check_command(args: argparse.Namespace) -> None:
    _check(args.root, args.deep)
    if not args.deep and not coco.is_coco_root(args.root):
        print("  images and masks were not opened: `clims-data check --deep` decodes every listed file")


def _check(root: Path, deep: bool = False) -> None:
    """Print split sizes and label statistics (mean/min classes per image, images per class); with ``deep``
    first decode every listed file and raise naming all bad ones."""
    if coco.is_coco_root(root):
        if deep:
            raise coco.COCORootError(f"{root}: --deep checks VOC-layout roots only; run `clims-data check` without it")
        _check_coco(Path(root).expanduser())
        return
    root = validate_voc_root(root)
    is_toy = toy.read_toy_meta(root) is not None
    classes = list(toy.TOY_CLASSES) if is_toy else list(VOC_CLASSES)
    names = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt") if p.stem != "train_aug")
    if (root / "SegmentationClassAug").is_dir():
        names.append("train_aug")
    splits = {name: read_split(root, name) for name in names}
    if deep:
        problems = _deep_check(root, splits, len(classes))
        for problem in problems:
            print(f"  bad: {problem}", file=sys.stderr)
        if problems:
            raise VOCRootError(f"{root}: {len(problems)} bad file(s) or id(s), listed above")
    for name, ids in splits.items():
        line = f"  {name:<10} {len(ids):>6} ids"
        if name != "test" and ids:
            labels = image_labels(root, ids, classes, None)
            per_image = labels.sum(1)
            per_class = ", ".join(f"{c} {int(n)}" for c, n in zip(classes, labels.sum(0), strict=True))
            line += f"; classes/image mean {per_image.mean():.3f} min {int(per_image.min())}; {per_class}"
        print(line)
    if "train_aug" in splits and not is_toy:
        check_train_aug(root, splits["train_aug"], VOC_TRAIN_AUG_SIZE)


#: A split id must be a plain file name (VOC: 2007_000032).
_ID = re.compile(r"[\w.-]+")


def _deep_check(root: Path, splits: dict[str, list[str]], num_classes: int) -> list[str]:
    """Every problem of the listed files, one ``path: what`` line each (all of them, not only the first).

    Ids: no duplicates or path characters in a split list. Every id: ``JPEGImages/<id>.jpg`` decodes. Ids of
    the listed splits except test: an Annotations XML that parses and a ``SegmentationClass`` mask. Val ids
    (and any id that has one): a ``SegmentationClassAug`` mask. Masks decode to index PNGs with values in
    0..C or 255, of the image's size.
    """
    problems: list[str] = []
    listed = root / "ImageSets" / "Segmentation"
    for name, ids in splits.items():
        where = f"{listed / name}.txt" if name != "train_aug" else "train_aug"
        problems += [
            f"{where}: id {i!r} is listed more than once" for i in sorted({i for i in ids if ids.count(i) > 1})
        ]
        problems += [f"{where}: id {i!r} is not a file name" for i in ids if not _ID.fullmatch(i)]
    labelled = {i for name, ids in splits.items() if name not in ("test", "train_aug") for i in ids}
    aug_required = set(splits.get("val", [])) if (root / "SegmentationClassAug").is_dir() else set()
    every = sorted({i for ids in splits.values() for i in ids if _ID.fullmatch(i)})

    def check_id(image_id: str) -> list[str]:
        found: list[str] = []
        image = _decode_or_report(root / "JPEGImages" / f"{image_id}.jpg", image_id, False, found)
        masks = []
        if image_id in labelled:
            xml = root / "Annotations" / f"{image_id}.xml"
            try:
                ET.parse(xml)
            except (OSError, ET.ParseError) as err:
                found.append(f"{xml}: {'missing' if isinstance(err, FileNotFoundError) else err}")
            masks.append(root / "SegmentationClass" / f"{image_id}.png")
        aug = root / "SegmentationClassAug" / f"{image_id}.png"
        if image_id in aug_required or aug.is_file():
            masks.append(aug)
        for path in masks:
            mask = _decode_or_report(path, image_id, True, found)
            if mask is None:
                continue
            bad = sorted(set(np.unique(mask).tolist()) - {*range(num_classes + 1), 255})
            if bad:
                found.append(f"{path}: values {bad} outside 0..{num_classes} and 255")
            if image is not None and mask.shape != image.shape[:2]:
                found.append(f"{path}: size {mask.shape} differs from the image's {image.shape[:2]}")
        return found

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for found in tqdm(pool.map(check_id, every), total=len(every), desc="check --deep", unit=" ids"):
            problems += found
    return problems


def _decode_or_report(path: Path, image_id: str, index: bool, found: list[str]) -> np.ndarray | None:
    """decode_image, or None with a ``path: what`` line added to ``found``."""
    try:
        return decode_image(path, image_id, index=index)
    except FileNotFoundError:
        found.append(f"{path}: missing")
    except ImageFileError as err:
        found.append(f"{path}: cannot decode ({err.__cause__})")
    except VOCRootError as err:
        found.append(str(err))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clims-data``; errors print one line and return exit status 1."""
    args = _parser().parse_args(argv)
    commands = {"download": _download, "toy": _toy, "check": _check_command, "coco-masks": _coco_masks}
    try:
        commands[args.command](args)
    except (ValueError, download.DownloadError, OSError) as err:
        print(f"clims-data {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
