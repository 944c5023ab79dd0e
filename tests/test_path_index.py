"""Path index (docs/reference.md#path-index): direction counts, hand-checked paths, index layout, path-max affinities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clims_pl.refine.path_index import PathIndex, direction_path, edge_to_affinity, search_directions, search_paths


@pytest.mark.parametrize(("radius", "count"), [(10, 152), (5, 34), (2, 4)])
def test_direction_counts(radius: int, count: int) -> None:
    dirs = search_directions(radius)
    assert len(dirs) == count
    assert len(set(dirs)) == count
    # half-plane: no direction appears with its opposite, and none is the origin
    assert not {(-dy, -dx) for dy, dx in dirs} & set(dirs)
    # brute force over the disc: exactly half of the non-zero offsets with x² + y² < r²
    disc = [
        (y, x) for y in range(-radius, radius + 1) for x in range(-radius, radius + 1) if 0 < x * x + y * y < radius**2
    ]
    assert 2 * count == len(disc)


def test_hand_checked_paths() -> None:
    # (2, 1): |2x − y| ≤ 2 keeps all 6 bounding-box points; sorted by |y|+|x| desc, scan order among ties
    assert direction_path(2, 1).tolist() == [[2, 1], [1, 1], [2, 0], [0, 1], [1, 0], [0, 0]]
    assert direction_path(0, 3).tolist() == [[0, 3], [0, 2], [0, 1], [0, 0]]
    # (3, −3): |x + y| ≤ 1 of the 16 box points -> 10 points, destination first, source last
    path = direction_path(3, -3).tolist()
    assert len(path) == 10 and path[0] == [3, -3] and path[-1] == [0, 0]
    assert all(abs(y + x) <= 1 for y, x in path)


def test_groups_sorted_by_length_and_cover_all_directions() -> None:
    groups = search_paths(10)
    lengths = [g.shape[1] for g in groups]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    assert sum(len(g) for g in groups) == 152


def test_index_layout_128_grid() -> None:
    index = PathIndex(10, (128, 128))
    assert index.radius_floor == 9
    assert index.num_sources == 119 * 110 == 13090
    assert index.dst_indices.shape == (152, 13090)
    # destinations are the sources shifted by (dy, dx); the last path point is the source itself
    for (dy, dx), dst in zip(index.search_dst, index.dst_indices, strict=True):
        assert np.array_equal(dst, index.src_indices + dy * 128 + dx)
    for group in index.path_indices:
        assert np.array_equal(group[:, -1], np.broadcast_to(index.src_indices, group[:, -1].shape))
    # first source is (0, rf) = flat 9
    assert index.src_indices[0] == 9


def test_edge_to_affinity_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    height, width, radius = 9, 12, 4
    edge = rng.random((height, width)).astype(np.float32)
    index = PathIndex(radius, (height, width))
    aff = edge_to_affinity(torch.from_numpy(edge)[None], index.torch_path_indices())[0].numpy()
    rf = index.radius_floor
    paths = [p for g in index.search_paths for p in g]
    srcs = [(y, x) for y in range(height - rf) for x in range(rf, width - rf)]
    for d, path in enumerate(paths):
        for p, (y, x) in enumerate(srcs):
            expected = 1 - max(edge[y + dy, x + dx] for dy, dx in path)
            assert aff[d, p] == pytest.approx(expected, abs=1e-6)


def test_boundary_cuts_affinity() -> None:
    # a vertical wall of E = 1 at column 6: every pair crossing it has affinity 0, every other pair 1
    edge = torch.zeros(1, 10, 13)
    edge[..., 6] = 1.0
    index = PathIndex(3, (10, 13))
    aff = edge_to_affinity(edge, index.torch_path_indices())[0]
    src_x = torch.from_numpy(index.src_indices % 13)
    dst_x = torch.from_numpy(index.dst_indices % 13)
    touches = (torch.minimum(src_x, dst_x) <= 6) & (torch.maximum(src_x, dst_x) >= 6)
    assert torch.equal(aff == 0, touches.expand_as(aff))
    assert torch.all(aff[~touches.expand_as(aff)] == 1)
