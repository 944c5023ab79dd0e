"""MS-COCO 2014 path (data/coco.py): the toy world written in the COCO layout (polygon, compressed and uncompressed
RLE segmentations, crowd annotations, an image without annotations) must give back the toy world's own labels
and masks, and CAM evaluation over 81 classes must run through the VOC metrics code."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from pycocotools import mask as mask_utils

from clims_pl.data import coco
from clims_pl.data.cli import main as data_main
from clims_pl.data.datamodule import COCODataModule
from clims_pl.data.toy import TOY_CLASSES
from clims_pl.data.voc import load_image, load_mask, read_split
from clims_pl.evaluate import display_names, evaluate_cams
from clims_pl.io import atomic_save_npz
from clims_pl.pipeline import compose_stage, stages_from_config
from clims_pl.stages import evaluate as evaluate_stage

TOY_TO_COCO = {"aeroplane": "airplane", "boat": "boat", "cow": "cow", "train": "train"}
#: toy mask value → COCO channel index + 1
TOY_VALUE = {i + 1: coco.COCO_CLASSES.index(TOY_TO_COCO[c]) + 1 for i, c in enumerate(TOY_CLASSES)}
PERSON = coco.COCO_CLASSES.index("person")


def _categories() -> list[dict]:
    return [
        {"id": i, "name": n, "supercategory": "x"}
        for i, n in zip(coco.COCO_CATEGORY_IDS, coco.COCO_CLASSES, strict=True)
    ]


def _row_polygons(binary: np.ndarray) -> list[list[float]]:
    """A mask as one pixel-edge rectangle polygon per horizontal run (exact under pycocotools rasterisation)."""
    polygons = []
    for y, row in enumerate(binary):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        for x0, x1 in zip(edges[::2], edges[1::2], strict=True):
            polygons.append([float(v) for v in (x0, y, x1, y, x1, y + 1, x0, y + 1)])
    return polygons


def _uncompressed_rle(binary: np.ndarray) -> dict:
    flat = binary.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"counts": [int(c) for c in counts], "size": list(binary.shape)}


def _segmentation(binary: np.ndarray, kind: int) -> list | dict:
    if kind == 0:
        return _row_polygons(binary)
    if kind == 1:
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        return {"counts": rle["counts"].decode(), "size": list(binary.shape)}
    return _uncompressed_rle(binary)


def write_toy_coco(toy_root: Path, out: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The toy world's first train_aug and val images in the COCO layout; returns split → id → (mask, labels)."""
    expected: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    kind = 0
    for split, toy_split, count, offset in (("train2014", "train_aug", 8, 1), ("val2014", "val", 4, 500)):
        (out / split).mkdir(parents=True)
        images, anns, expected[split] = [], [], {}
        for j, toy_id in enumerate(read_split(toy_root, toy_split)[:count]):
            number = offset + 7 * j  # sparse, as COCO ids are
            name = f"COCO_{split}_{number:012d}"
            shutil.copy(toy_root / "JPEGImages" / f"{toy_id}.jpg", out / split / f"{name}.jpg")
            toy_mask = load_mask(toy_root, toy_id, aug=True)
            h, w = toy_mask.shape
            images.append({"id": number, "file_name": f"{name}.jpg", "height": h, "width": w})
            mask, labels = np.zeros_like(toy_mask), np.zeros(80, np.float32)
            if j == 1:  # an image without annotations: all-background mask, no label
                expected[split][name] = (mask, labels)
                continue
            for value in sorted(set(np.unique(toy_mask)) - {0, 255}):
                binary = toy_mask == value
                category = coco.COCO_CATEGORY_IDS[TOY_VALUE[value] - 1]
                anns.append(
                    {
                        "image_id": number,
                        "category_id": category,
                        "iscrowd": 0,
                        "segmentation": _segmentation(binary, kind),
                    }
                )
                kind = (kind + 1) % 3
                mask[binary], labels[TOY_VALUE[value] - 1] = TOY_VALUE[value], 1
            if j % 3 == 0:  # a crowd "person" over the top-left corner: a label (CocoDetection) but never painted
                crowd = np.zeros((h, w), bool)
                crowd[:6, :6] = True
                anns.append(
                    {"image_id": number, "category_id": 1, "iscrowd": 1, "segmentation": _segmentation(crowd, 1)}
                )
                labels[PERSON] = 1
            expected[split][name] = (mask, labels)
        for i, ann in enumerate(anns):
            ann.update(id=i + 1, area=1.0, bbox=[0, 0, 1, 1])
        (out / "annotations").mkdir(exist_ok=True)
        data = {"images": images[::-1], "annotations": anns, "categories": _categories()}  # ids not in file order
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return expected


@pytest.fixture(scope="module")
def world(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("coco") / "coco"
    return out, write_toy_coco(toy_root, out)


def test_labels_ids_and_cache(world: tuple[Path, dict], tmp_path: Path) -> None:
    root, expected = world
    dm = COCODataModule(
        root, coco.COCO_CLASSES, prompts="coco", train_split="train2014", val_split="val2014",
        infer_split="train2014:3", label_cache_dir=tmp_path, num_workers=0,
    )  # fmt: skip
    dm.setup()
    ids, labels = dm.split("train2014")
    assert ids == sorted(expected["train2014"])  # sorted numeric ids, file names without extension
    np.testing.assert_array_equal(labels, np.stack([expected["train2014"][i][1] for i in ids]))
    assert labels[0, PERSON] == 1 and labels[0].sum() >= 2  # crowd counts as a label
    assert labels[1].sum() == 0  # the image without annotations
    assert dm.split("train2014:3")[0] == ids[:3]
    assert len(list(tmp_path.glob("coco-labels-*.npz"))) == 2
    again = coco.coco_labels(root, "train2014", coco.COCO_CLASSES, tmp_path)
    assert again[0] == ids and np.array_equal(again[1], labels)
    batch = next(iter(COCODataModule(
        root, coco.COCO_CLASSES, prompts="coco", train_split="train2014", batch_size=2, num_workers=0, crop_size=32,
        resize_long=[32, 48],
    ).train_dataloader()))  # fmt: skip
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 80)
    item = dm.predict_dataset()[0]
    assert item["id"] == ids[0] and len(item["images"]) == 4 and item["label"].shape == (80,)
    assert dm.prompt_bank.class_prompts()[PERSON] == ["a photo of player."]


def test_masks_equal_the_toy_world_and_resume(world: tuple[Path, dict]) -> None:
    root, expected = world
    assert data_main(["coco-masks", "--root", str(root), "--threads", "2"]) == 0
    for images in expected.values():
        for name, (mask, _) in images.items():
            np.testing.assert_array_equal(coco.load_coco_mask(root, name), mask, err_msg=name)
    first = sorted(expected["train2014"])[0]
    path = coco.coco_mask_path(root, first)
    assert path == root / "mask" / "train2014" / f"{int(first[-12:])}.png"
    stamp = path.stat().st_mtime_ns
    coco.write_coco_masks(root, "train2014", progress=False)  # resumable: existing PNGs are kept
    assert path.stat().st_mtime_ns == stamp


def test_overlap_polygon_and_stale_masks(tmp_path: Path) -> None:
    """Hand-computed: the later annotation wins where two overlap; masks of another json are an error."""
    (tmp_path / "val2014").mkdir()
    (tmp_path / "annotations").mkdir()
    anns = [
        {"id": 1, "image_id": 3, "category_id": 5, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
        {"id": 2, "image_id": 3, "category_id": 21, "iscrowd": 0, "segmentation": [[3, 2, 7, 2, 7, 6, 3, 6]]},
    ]
    data = {"images": [{"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": 8, "width": 8}],
            "annotations": anns, "categories": _categories()}  # fmt: skip
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps(data))
    coco.write_coco_masks(tmp_path, "val2014", progress=False)
    want = np.zeros((8, 8), np.uint8)
    want[1:4, 1:5] = coco.COCO_CLASSES.index("airplane") + 1  # 5
    want[2:6, 3:7] = coco.COCO_CLASSES.index("cow") + 1  # 20
    np.testing.assert_array_equal(coco.load_coco_mask(tmp_path, "COCO_val2014_000000000003"), want)
    path.write_text(json.dumps({**data, "annotations": anns[:1]}))
    with pytest.raises(coco.COCORootError, match="another instances file"):
        coco.write_coco_masks(tmp_path, "val2014", progress=False)


def test_cam_evaluation_over_81_classes(world: tuple[Path, dict], tmp_path: Path) -> None:
    """Perfect CAMs except one class zeroed in one image: IoUs computed by hand from the masks."""
    root, expected = world
    coco.write_coco_masks(root, "train2014", progress=False)
    ids = read_split(root, "train2014")  # dispatches to the instances file on a COCO root
    assert load_image(root, ids[0]).shape == (*expected["train2014"][ids[0]][0].shape, 3)
    dropped_id, dropped = ids[0], None
    for image_id in ids:
        mask = expected["train2014"][image_id][0]
        keys = np.array(sorted(set(np.unique(mask)) - {0}), dtype=np.int64) - 1
        high_res = (
            np.stack([(mask == k + 1).astype(np.float32) for k in keys])
            if len(keys)
            else np.zeros((0, *mask.shape), np.float32)
        )
        if image_id == dropped_id:
            dropped = int(keys[0])
            high_res[0] = 0
        cam = high_res[:, ::4, ::4]
        atomic_save_npz(tmp_path / f"{image_id}.npz", keys=keys, cam=cam, high_res=high_res)
    names = display_names(coco.COCO_CLASSES, "coco")
    result = evaluate_cams(tmp_path, root, ids, [0.15], 0.15, names)
    masks = [expected["train2014"][i][0] for i in ids]
    total = sum(int((m == dropped + 1).sum()) for m in masks)
    lost = int((masks[0] == dropped + 1).sum())
    background = sum(int((m == 0).sum()) for m in masks)
    present = sorted({int(v) for m in masks for v in np.unique(m)})
    assert len(result["iou"]) == 81 and names[PERSON + 1] == "player"
    assert result["iou"][names[dropped + 1]] == pytest.approx((total - lost) / total)
    assert result["iou"]["background"] == pytest.approx(background / (background + lost))
    assert result["miou"] == pytest.approx(
        (len(present) - 2 + (total - lost) / total + background / (background + lost)) / len(present)
    )
    assert sum(v is not None for v in result["iou"].values()) == len(present)  # absent classes: NaN, not 0
    # The clims-eval stage with data=coco reaches the same numbers (split ids from the instances file).
    cfg = compose_config(
        "eval", tmp_path, ["data=coco", f"data.root={root}", f"eval.cam_dir={tmp_path}", "eval.split=train2014:4"]
    )
    staged = evaluate_stage.run(cfg)
    assert staged["num_images"] == 4 and (tmp_path / "run" / "metrics" / "cams.json").is_file()
    assert staged["iou"]["background"] == pytest.approx(
        evaluate_cams(tmp_path, root, ids[:4], [0.15], 0.15, names)["iou"]["background"]
    )


def test_prompt_bank_has_the_reference_lists() -> None:
    from clims_pl.prompts.bank import load_prompt_bank

    bank = load_prompt_bank("coco", coco.COCO_CLASSES)
    assert len(bank.background) == 88 == len(set(bank.background))
    assert bank.background[:3] == ("street sign", "mountain", "video game") and bank.background[-1] == "park"
    assert bank.text_names == {"person": "player"} and bank.templates == ("a photo of {}.",)


def test_bad_inputs(world: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = world
    with pytest.raises(coco.COCORootError, match="train2014:10000"):
        coco.parse_split("train2014:x")
    with pytest.raises(coco.COCORootError, match=r"cocodataset\.org"):
        coco.annotation_file(tmp_path, "train2014")
    with pytest.raises(FileNotFoundError, match="clims-data coco-masks"):
        coco.load_coco_mask(tmp_path, "COCO_val2014_000000000001")
    with pytest.raises(coco.COCORootError, match=r"not in data\.classes"):
        coco.coco_labels(root, "val2014", coco.COCO_CLASSES[:79], None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install 'clims-pl\[coco\]'"):
        coco._pycocotools()


def test_check_command(world: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    root, expected = world
    coco.write_coco_masks(root, "val2014", progress=False)
    assert data_main(["check", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["train2014"].split()[1:3] == [str(len(expected["train2014"])), "ids;"]
    assert f"{len(expected['val2014'])} ground-truth masks" in lines["val2014"] and "--deep" not in out
    assert data_main(["check", "--deep", "--root", str(root)]) == 1  # --deep is VOC-only: a clear error, not a pass
    assert "--deep checks VOC-layout roots only" in capsys.readouterr().err


def test_paper_coco_pins_the_reference(tmp_path: Path) -> None:
    """Every number of the reference README's COCO command and run_sample_coco.py's defaults."""
    cfg = compose_config("reproduce", tmp_path, ["experiment=paper_coco", "data.root=/data/coco"])
    stages = {
        s.name: compose_stage(s, s.folder(Path(cfg.run_dir)), tmp_path, []) for s in stages_from_config(cfg.pipeline)
    }
    assert list(stages) == ["cam", "clims", "cams", "eval_cams", "ir_labels", "irn", "pseudo", "report"]
    cam, clims, cams = stages["cam"], stages["clims"], stages["cams"]
    assert (cam.trainer.max_epochs, cam.model.optim.lr, cam.data.batch_size, cam.model.net.bn_mode) == (
        5,
        0.1,
        16,
        "fixed",
    )
    assert cam.data._target_ == "clims_pl.data.datamodule.COCODataModule" and cam.model.net.num_classes == 80
    loss = clims.loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.delta, loss.cbs_threshold) == (2.0, 14.0, 1.25, 0.2, 0.285)
    assert (clims.trainer.max_epochs, clims.model.optim.lr, clims.data.batch_size) == (8, 5e-4, 16)
    assert (clims.trainer.devices, clims.trainer.sync_batchnorm) == (2, True)
    assert clims.trainer.strategy == "ddp_spawn_find_unused_parameters_true" and clims.data.prompts == "coco"
    assert clims.model.init_ckpt == f"{cfg.run_dir}/cam/checkpoints/last.ckpt"
    assert (cams.trainer.devices, cams.data.infer_split, cams.data.scales) == (
        1,
        "train2014:10000",
        [1.0, 0.5, 1.5, 2.0],
    )
    assert (stages["eval_cams"].eval.threshold, stages["eval_cams"].eval.split) == (0.15, "train2014:10000")
    ir = stages["ir_labels"].ir_labels
    assert (ir.fg_threshold, ir.bg_threshold, ir.split) == (0.35, 0.1, "train2014:10000")
    irn = stages["irn"]
    assert (irn.data.train_split, irn.model.num_classes, irn.data.batch_size, irn.trainer.max_epochs) == (
        "train2014:10000",
        80,
        32,
        3,
    )
    pseudo = stages["pseudo"].pseudo
    assert (pseudo.bg_threshold, pseudo.radius, pseudo.beta, pseudo.exp_times) == (0.25, 5, 10, 8)
