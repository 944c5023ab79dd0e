"""IRNet path index (docs/reference.md#path-index): which pixel pairs an affinity links, and through which pixels.

An inter-pixel affinity between a source pixel and a destination pixel within ``radius`` is
``1 − max(boundary)`` along the straight path between them. The path index lists, for every search direction,
the flat indices of the path pixels of every source pixel, so the affinities of a whole image come from one
gather + max. Directions cover a half-plane, so each unordered pair appears once.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def search_directions(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) offsets of the half-plane disc: (0, 1..r−1), then rows 1..r−1 with x² + y² < r²."""
    r = radius
    dirs = [(0, x) for x in range(1, r)]
    dirs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < r * r]
    return dirs


def direction_path(dy: int, dx: int) -> np.ndarray:
    """Grid points within distance 1 of the segment (0,0)–(dy,dx), destination first (decreasing |y| + |x|).

    The order among points of equal |y| + |x| is the scan order (y, then x), as in the reference (stable sort).
    """
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 / length_sq < 1
    ]
    points.sort(key=lambda p: -abs(p[0]) - abs(p[1]))
    return np.asarray(points, dtype=np.int64)


def search_paths(radius: int) -> list[np.ndarray]:
    """Paths grouped by length (shortest group first): each group is (n_dirs, path_len, 2) of (y, x) offsets."""
    groups: dict[int, list[np.ndarray]] = {}
    for dy, dx in search_directions(radius):
        path = direction_path(dy, dx)
        groups.setdefault(len(path), []).append(path)
    return [np.stack(groups[length]) for length in sorted(groups)]


class PathIndex:
    """Flat path / source / destination indices of every pair on an (H, W) grid (reference ``PathIndex``).

    Sources are rows [0, H − rf) × columns [rf, W − rf) with rf = ceil(radius) − 1, so every destination of
    every source lies on the grid.

    Attributes:
        search_dst: (D, 2) destination offsets (dy, dx), in path-length-group order.
        path_indices: per length group, (n_dirs, path_len, P) int64 flat indices (destination first, source last).
        src_indices: (P,) flat source indices.
        dst_indices: (D, P) flat destination indices.
    """

    def __init__(self, radius: int, size: tuple[int, int]) -> None:
        self.radius = radius
        self.radius_floor = int(math.ceil(radius) - 1)
        self.size = (int(size[0]), int(size[1]))
        height, width = self.size
        rf = self.radius_floor
        crop_h, crop_w = height - rf, width - 2 * rf
        if crop_h <= 0 or crop_w <= 0:
            raise ValueError(f"grid {self.size} too small for a path index of radius {radius}")
        self.search_paths = search_paths(radius)
        self.search_dst = np.concatenate([group[:, 0] for group in self.search_paths])
        full = np.arange(height * width, dtype=np.int64).reshape(height, width)

        def shifted(dy: int, dx: int) -> np.ndarray:
            return full[dy : dy + crop_h, rf + dx : rf + dx + crop_w].reshape(-1)

        self.path_indices = [
            np.stack([np.stack([shifted(dy, dx) for dy, dx in path]) for path in group]) for group in self.search_paths
        ]
        self.src_indices = shifted(0, 0)
        self.dst_indices = np.concatenate([group[:, 0] for group in self.path_indices])

    @property
    def num_directions(self) -> int:
        return len(self.search_dst)

    @property
    def num_sources(self) -> int:
        return len(self.src_indices)

    def torch_path_indices(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        return [torch.from_numpy(group).to(device) for group in self.path_indices]


def edge_to_affinity(edge: torch.Tensor, path_indices: list[torch.Tensor]) -> torch.Tensor:
    """Affinity ``1 − max(edge along the path)`` of every (direction, source) pair.

    Args:
        edge: (B, H, W) or (B, 1, H, W) boundary probabilities on the grid the path index was built for.
        path_indices: :meth:`PathIndex.torch_path_indices` on ``edge``'s device.

    Returns:
        (B, D, P) affinities, directions in ``search_dst`` order.
    """
    flat = edge.reshape(edge.shape[0], -1)
    affinities = []
    for index in path_indices:
        n_dirs, path_len, n_src = index.shape
        along = flat[:, index.reshape(-1)].view(flat.shape[0], n_dirs, path_len, n_src)
        affinities.append(1 - along.amax(dim=2))
    return torch.cat(affinities, dim=1)
