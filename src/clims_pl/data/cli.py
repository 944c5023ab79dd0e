"""``clims-data``: get, generate and check datasets (argparse, not Hydra: these commands need no config).

clims-data download voc --root data/VOCdevkit/VOC2012     # VOC2012 trainval + SBD SegmentationClassAug
clims-data toy --root data/toy                             # the procedural toy world (seconds, offline)
clims-data check --root data/VOCdevkit/VOC2012             # validate a root and count its splits
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clims_pl.data import download, toy
from clims_pl.data.voc import VOC_CLASSES, image_labels, read_split, validate_voc_root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clims-data",
        description="Get, generate and check the datasets of clims-pl (VOC layout).",
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
        description="Validate ROOT, print split sizes "
        "and label statistics (labels parsed from Annotations/, not cached).",
    )
    check.add_argument("--root", required=True, type=Path, help="a VOC2012 or toy root")
    return parser


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


def _check(root: Path) -> None:
    """Print split sizes and label statistics (mean/min classes per image, images per class)."""
    root = validate_voc_root(root)
    classes = list(toy.TOY_CLASSES) if toy.read_toy_meta(root) is not None else list(VOC_CLASSES)
    names = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt") if p.stem != "train_aug")
    if (root / "SegmentationClassAug").is_dir():
        names.append("train_aug")
    for name in names:
        ids = read_split(root, name)
        line = f"  {name:<10} {len(ids):>6} ids"
        if name != "test" and ids:
            labels = image_labels(root, ids, classes, None)
            per_image = labels.sum(1)
            per_class = ", ".join(f"{c} {int(n)}" for c, n in zip(classes, labels.sum(0), strict=True))
            line += f"; classes/image mean {per_image.mean():.3f} min {int(per_image.min())}; {per_class}"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clims-data``; errors print one line and return exit status 1."""
    args = _parser().parse_args(argv)
    commands = {"download": _download, "toy": _toy, "check": lambda a: _check(a.root)}
    try:
        commands[args.command](args)
    except (ValueError, download.DownloadError, OSError) as err:
        print(f"clims-data {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
