"""Random walk (docs/reference.md#stage-g-random-walk): sparse walk = dense reference, transition structure, label rule, pseudo stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cam_fixtures import write_cam_files, write_voc_root
from omegaconf import OmegaConf
from PIL import Image

from clims_pl.models.irn import IRNet
from clims_pl.provenance import ProvenanceError
from clims_pl.refine.random_walk import (
    boundary_pairs,
    propagate_to_edge,
    propagate_to_edge_dense,
    transition_matrix,
    walk_to_label,
)
from clims_pl.stages import pseudo


def _inputs(seed: int, height: int, width: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    edge = torch.rand(height, width, generator=g, dtype=torch.float64) ** 3
    cams = torch.rand(k, height, width, generator=g, dtype=torch.float64)
    return cams.to(dtype), edge.to(dtype)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.max()


@pytest.mark.parametrize(("seed", "size"), [(0, (9, 11)), (1, (12, 15)), (2, (6, 20))])
def test_sparse_walk_equals_dense_reference(seed: int, size: tuple[int, int]) -> None:
    cams, edge = _inputs(seed, *size, k=3, dtype=torch.float64)
    sparse = _normalised(propagate_to_edge(cams, edge))
    dense = _normalised(propagate_to_edge_dense(cams, edge))
    assert (sparse - dense).abs().max().item() <= 1e-10  # float64: the same operator, 256 steps vs 8 squarings
    # float32 (what runs in the pipeline): both paths stay within 2e-4 of the float64 walk, argmax agrees
    s32 = _normalised(propagate_to_edge(cams.float(), edge.float())).double()
    d32 = _normalised(propagate_to_edge_dense(cams.float(), edge.float())).double()
    assert (s32 - dense).abs().max().item() <= 2e-4
    assert (d32 - dense).abs().max().item() <= 2e-4
    assert torch.equal(s32.argmax(0), dense.argmax(0))


def test_pair_count_and_transition_structure() -> None:
    height, width, radius = 7, 9, 5
    edge = torch.rand(height, width, generator=torch.Generator().manual_seed(0))
    src, dst, aff = boundary_pairs(edge, radius)
    # brute force: every unordered pair within the radius-5 disc appears exactly once
    expected = {
        frozenset({(y, x), (y + dy, x + dx)})
        for y in range(height)
        for x in range(width)
        for dy in range(-4, 5)
        for dx in range(-4, 5)
        if 0 < dy * dy + dx * dx < 25 and 0 <= y + dy < height and 0 <= x + dx < width
    }
    pairs = {frozenset({divmod(int(s), width), divmod(int(d), width)}) for s, d in zip(src, dst, strict=True)}
    assert len(src) == len(expected) == len(pairs) and pairs == expected
    assert torch.all((aff >= 0) & (aff <= 1))
    walker = transition_matrix(edge, radius, beta=10)
    assert walker.layout == torch.sparse_csr
    row_nnz = walker.crow_indices().diff()
    assert int(row_nnz.max()) <= 2 * 34 + 1
    assert int(walker.values().numel()) == 2 * len(src) + height * width
    # rows of Tᵀ = columns of the reference T: each sums to 1
    assert torch.allclose(walker.to_dense().sum(dim=1), torch.ones(height * width), atol=1e-6)


def test_boundary_blocks_the_walk() -> None:
    # two regions split by a wall of E = 1: mass of a CAM on the left never reaches the right
    edge = torch.zeros(8, 12)
    edge[:, 6] = 1.0
    cams = torch.zeros(1, 8, 12)
    cams[0, :, :3] = 1.0
    walked = propagate_to_edge(cams, edge)
    assert walked[0, :, 6:].abs().max().item() == 0
    assert walked[0, :, :6].min().item() > 0


def test_walk_to_label_global_max_and_background() -> None:
    keys = np.array([2, 7])
    walked = torch.zeros(2, 2, 3)
    walked[0] = torch.tensor([1.0, 0.1, 0.1])  # class 3: strong on the left, weak elsewhere
    walked[1] = torch.tensor([0.0, 0.15, 0.15])  # class 8: right only, below 0.2 of the GLOBAL max
    label = walk_to_label(walked, keys, (7, 11), bg_threshold=0.2)
    assert label.shape == (7, 11) and label.dtype == np.uint8
    # ×4 bilinear (align_corners=False): output column c samples input (c + 0.5)/4 − 0.5
    assert np.all(label[:, :2] == 3)
    # column 10 samples input column 2.125 → clamped to 2: 0.1 vs 0.15 vs background 0.2 → background;
    # per-class normalisation would have made it class 8
    assert np.all(label[:, 10] == 0)
    assert 255 not in label
    assert np.all(walk_to_label(torch.zeros(0, 2, 2), np.zeros(0), (5, 5)) == 0)


def test_walk_to_label_at_stride_2() -> None:
    walked = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # ×2 bilinear (align_corners=False): pixel c samples cell (c + 0.5)/2 − 0.5, i.e. weights 1, .75, .25, 0 along
    # each axis; the product exceeds the plane 0.2 at (0, 0..2), (1, 0..1) and (2, 0) (0.25, 0.5625, 0.25).
    label = walk_to_label(walked, np.array([4]), (4, 4), bg_threshold=0.2, stride=2)
    expected = np.zeros((4, 4), np.uint8)
    expected[0, :3] = expected[1, :2] = expected[2, 0] = 5
    np.testing.assert_array_equal(label, expected)


def _pseudo_cfg(tmp_path: Path, compose_cfg, *overrides: str):
    """A two-image VOC root, its CAM files and a random resnet18 IRN checkpoint; the refine config for them."""
    masks = write_voc_root(tmp_path / "voc", {"a": (30, 41), "b": (36, 28)})
    write_cam_files(tmp_path / "cams", masks)
    torch.manual_seed(0)
    net = IRNet("resnet18", pretrained=False)
    ckpt = tmp_path / "irn.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    cfg = compose_cfg(
        "refine",
        [
            f"data.root={tmp_path / 'voc'}",
            f"ckpt={ckpt}",
            "model.net.backbone=resnet18",
            "model.net.inference_pad=64",
            f"pseudo.cam_dir={tmp_path / 'cams'}",
            "pseudo.split=train",
            "pseudo.eval_split=train",
            "pseudo.device=cpu",
            "pseudo.num_workers=0",
            *overrides,
        ],
    )
    return cfg, masks, net, ckpt


def test_pseudo_stage_writes_and_evaluates(tmp_path: Path, compose_cfg) -> None:
    cfg, masks, net, ckpt = _pseudo_cfg(tmp_path, compose_cfg)
    result = pseudo.run(cfg)
    out = Path(cfg.pseudo.out_dir)
    for image_id, mask in masks.items():
        with Image.open(out / f"{image_id}.png") as img:
            assert img.mode == "P"
            label = np.asarray(img)
        assert label.shape == mask.shape
        allowed = {0} | {int(c) for c in np.unique(mask) if 0 < c < 255}
        assert set(np.unique(label).tolist()) <= allowed  # only the image's classes, no 255
    assert result["written"] == 2 and result["num_images"] == 2
    assert 0.0 <= result["miou"] <= 1.0
    assert Path(cfg.pseudo.metrics_path).is_file()
    # diagnostics: one npz per evaluation image, the edge report, and the walk variants next to the mIoU
    diag_dir, metrics = Path(cfg.pseudo.diag_dir), Path(cfg.pseudo.metrics_path).parent
    assert sorted(p.stem for p in diag_dir.glob("*.npz")) == ["a", "b"]
    edges = json.loads((metrics / "irn_edges.json").read_text())
    assert edges["num_images"] == 2 and edges["counts"]["gt"] > 0 and (metrics / "irn_edges.md").is_file()
    assert set(result["diagnostics"]) >= {"no_walk", "no_edge", "oracle_edge", "irn_edge"}
    assert result["diagnostics"]["irn_edge"]["miou"] == result["miou"]
    assert "walk, oracle edges" in (metrics / "pseudo.md").read_text()
    (diag_dir / "a.npz").unlink()
    again = pseudo.run(cfg)  # resumable: no label left to write, the missing diagnostics file is recomputed
    assert again["written"] == 0 and again["skipped"] == 2 and again["miou"] == result["miou"]
    assert (diag_dir / "a.npz").is_file() and again["diagnostics"] == result["diagnostics"]
    # IRN retrained into the same file: its labels are not the old ones, so the folder is refused.
    torch.save({"state_dict": {f"net.{k}": v + 0.01 for k, v in net.state_dict().items()}}, ckpt)
    with pytest.raises(ProvenanceError, match=r"pseudo holds pseudo labels made from other ckpt"):
        pseudo.run(cfg)


def test_pseudo_stage_at_scale_2(tmp_path: Path, compose_cfg) -> None:
    cfg, masks, _, _ = _pseudo_cfg(tmp_path, compose_cfg, "pseudo.scale=2", "model.net.inference_pad=128")
    result = pseudo.run(cfg)
    for image_id, mask in masks.items():  # labels at the image's size, not the ×2 image's
        with Image.open(Path(cfg.pseudo.out_dir) / f"{image_id}.png") as img:
            assert np.asarray(img).shape == mask.shape
    # the boundary map and the walked maps on the ×2 image's stride-4 grid: (60, 82) px → 15 × 21 cells of 2 px
    with np.load(Path(cfg.pseudo.diag_dir) / "a.npz") as diag:
        assert diag["edge"].shape == (15, 21) and diag["walked"].shape[1:] == (15, 21)
    edges = json.loads((Path(cfg.pseudo.metrics_path).parent / "irn_edges.json").read_text())
    assert edges["cell_px"] == 2 and result["written"] == 2
    # labels of another scale in the folder are refused, and 4 / scale must be whole
    with pytest.raises(ProvenanceError, match="pseudo holds pseudo labels made from other"):
        pseudo.run(OmegaConf.merge(cfg, {"pseudo": {"scale": 1.0}}))
    with pytest.raises(ValueError, match=r"pseudo.scale=1.5: .* must be a whole number"):
        pseudo.run(OmegaConf.merge(cfg, {"pseudo": {"scale": 1.5}}))
