"""VOCDataModule on the toy world: batches, labels, determinism, multi-scale input (docs/reference.md#stage-c-cam-inference), configs, toy generation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from clims_pl.config import CONF_DIR
from clims_pl.data.datamodule import (
    ClassificationDataset,
    MultiScaleDataset,
    VOCDataModule,
    collate_multiscale,
)
from clims_pl.data.toy import TOY_CLASSES, ToyError, generate_toy
from clims_pl.data.transforms import imagenet_normalize, seed_worker_transform, train_transform
from clims_pl.data.voc import VOC_CLASSES, image_labels, load_image

TOY = {"seed": 0, "size": 64, "n_train_aug": 16, "n_train": 4, "n_val": 6}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_toy(tmp_path_factory.mktemp("dm") / "toy", progress=False, **TOY)


def _dm(root: Path, **overrides: object) -> VOCDataModule:
    kwargs = dict(
        root=root,
        classes=list(TOY_CLASSES),
        prompts="toy",
        batch_size=4,
        num_workers=0,
        crop_size=64,
        resize_long=(40, 80),
        label_cache_dir=None,
    )
    kwargs.update(overrides)
    return VOCDataModule(**kwargs)


def test_train_and_val_batches(toy_root: Path) -> None:
    dm = _dm(toy_root)
    dm.setup("fit")
    assert dm.classes == list(TOY_CLASSES) and dm.num_classes == 4
    loader = dm.train_dataloader()
    assert len(loader) == 16 // 4 and loader.drop_last
    seen = []
    for batch in loader:
        assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
        expected = image_labels(toy_root, batch["id"], TOY_CLASSES, None)
        np.testing.assert_array_equal(batch["label"].numpy(), expected)
        seen += batch["id"]
    assert sorted(seen) == dm.split("train_aug")[0]
    val = [b["image"] for b in dm.val_dataloader()]
    again = [b["image"] for b in dm.val_dataloader()]
    assert sum(len(v) for v in val) == 6
    for a, b in zip(val, again, strict=True):
        torch.testing.assert_close(a, b)


def test_train_batch_too_small_is_explained(toy_root: Path) -> None:
    with pytest.raises(ValueError, match=r"fewer than data\.batch_size=32"):
        _dm(toy_root, batch_size=32).train_dataloader()


def test_seed_everything_repeats_augmentation(toy_root: Path) -> None:
    def first_batch() -> torch.Tensor:
        L.seed_everything(7, verbose=False)
        return next(iter(_dm(toy_root).train_dataloader()))["image"]

    torch.testing.assert_close(first_batch(), first_batch())


def test_workers_draw_different_augmentations(toy_root: Path) -> None:
    image_id = "toy_000000"
    dataset = ClassificationDataset(
        toy_root, [image_id] * 4, np.zeros((4, 4), np.float32), train_transform(48, (40, 80))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker_transform)
    images = [b["image"] for b in loader]  # items 0, 2 from worker 0 and 1, 3 from worker 1
    assert not torch.equal(images[0], images[1])  # unseeded forked workers would replay the same crops


def test_multiscale_item_shapes_rounding_and_flip(tmp_path: Path) -> None:
    (tmp_path / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (75, 50, 3), dtype=np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    labels = np.array([[0, 1, 1]], np.float32)
    item = MultiScaleDataset(tmp_path, ["a"], labels, (1.0, 0.5, 1.5, 2.0))[0]
    assert item["id"] == "a" and item["size"] == (75, 50)
    # round() as in the reference's pil_rescale: 37.5 -> 38 and 112.5 -> 112 (half to even).
    assert [tuple(x.shape) for x in item["images"]] == [
        (2, 3, 75, 50),
        (2, 3, 38, 25),
        (2, 3, 112, 75),
        (2, 3, 150, 100),
    ]
    expected = torch.from_numpy(imagenet_normalize(load_image(tmp_path, "a"))).permute(2, 0, 1)
    torch.testing.assert_close(item["images"][0][0], expected)  # scale 1.0 untouched
    for x in item["images"]:
        torch.testing.assert_close(x[1], x[0].flip(-1))
    batch = collate_multiscale([item, item])
    assert batch["id"] == ["a", "a"] and batch["label"].shape == (2, 3) and batch["size"] == [(75, 50)] * 2
    assert len(batch["images"]) == 2 and len(batch["images"][0]) == 4


class _Echo(L.LightningModule):
    def predict_step(self, batch: dict, batch_idx: int) -> tuple[str, list[tuple[int, ...]]]:
        return batch["id"][0], [tuple(x.shape) for x in batch["images"][0]]


def test_predict_dataloader_under_lightning(toy_root: Path) -> None:
    dm = _dm(toy_root, infer_split="val", scales=(1.0, 0.5))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    out = trainer.predict(_Echo(), datamodule=dm)
    assert [image_id for image_id, _ in out] == dm.split("val")[0]
    assert out[0][1] == [(2, 3, 64, 64), (2, 3, 32, 32)]


def test_toy_world_generated_on_demand(tmp_path: Path) -> None:
    toy = {"size": 48, "n_train_aug": 8, "n_train": 4, "n_val": 4}
    dm = _dm(tmp_path / "toy", toy=toy, batch_size=2, crop_size=48, label_cache_dir=tmp_path / "cache")
    dm.prepare_data()
    assert len(dm.split("train_aug")[0]) == 8 and any((tmp_path / "cache").iterdir())
    with pytest.raises(ToyError, match="was generated with"):
        _dm(tmp_path / "toy", toy={**toy, "seed": 9}).prepare_data()


def test_classes_are_validated(toy_root: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.classes is empty"):
        _dm(toy_root, classes=[])
    with pytest.raises(ValueError, match="lists cow more than once"):
        _dm(toy_root, classes=["cow", "boat", "cow"])


@pytest.mark.parametrize("name", ["voc", "toy"])
def test_data_configs_instantiate(name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")}})
    cfg.data = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
    dm = instantiate(cfg.data)
    assert isinstance(dm, VOCDataModule) and dm.classes == list(cfg.data.classes)
    assert dm.classes == (list(VOC_CLASSES) if name == "voc" else list(TOY_CLASSES))
    assert not (tmp_path / "data").exists()  # building the module touches no disk
    if name == "toy":
        assert dm.hparams.toy == {"seed": 0, "size": 128, "n_train_aug": 400, "n_train": 200, "n_val": 200}
        assert dm.hparams.crop_size == 128 and dm.hparams.resize_long == [80, 160]
