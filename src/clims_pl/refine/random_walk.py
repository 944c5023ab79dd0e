"""Random walk of CAMs on the IRN boundary map (docs/reference.md#stage-g-random-walk, ``indexing.propagate_to_edge``).

The reference builds a dense n×n transition matrix (n = h·w on the stride-4 grid, ~0.5 GB for a VOC image)
and squares it ``exp_times`` = 8 times (quirk docs/reference.md#q16-dense-random-walk). Each column of T has at most 2·D + 1 non-zeros (69 for
radius 5), so ``x · T^(2^8)`` is computed here as 256 sparse matrix-vector products — never an n×n matrix.
In exact arithmetic both give the same result; :func:`propagate_to_edge_dense` keeps the reference path for
tests and ``benchmarks/bench_random_walk.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from clims_pl.refine.path_index import PathIndex, edge_to_affinity


def boundary_pairs(edge: torch.Tensor, radius: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pixel pair within ``radius`` on the (h, w) grid and its affinity ``1 − max(E along the path)``.

    As in the reference, E is padded with 1.0 by ``radius`` on the left, right and bottom so that the path index
    (whose sources skip the borders) covers every pixel; pairs touching the padding are dropped.

    Returns:
        (src, dst, affinity): flat indices into the unpadded h·w grid, each pair once (half-plane directions).
    """
    height, width = edge.shape[-2:]
    edge = edge.reshape(1, 1, height, width)
    padded = F.pad(edge, (radius, radius, 0, radius), mode="constant", value=1.0)
    pad_h, pad_w = height + radius, width + 2 * radius
    index = PathIndex(radius, (pad_h, pad_w))
    affinity = edge_to_affinity(padded, index.torch_path_indices(edge.device))[0]  # (D, P)
    src = torch.from_numpy(index.src_indices).to(edge.device).expand_as(affinity)
    dst = torch.from_numpy(index.dst_indices).to(edge.device)

    def unpad(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, x = flat // pad_w, flat % pad_w - radius
        inside = (y < height) & (x >= 0) & (x < width)
        return y * width + x, inside

    src_flat, src_in = unpad(src)
    dst_flat, dst_in = unpad(dst)
    keep = src_in & dst_in
    return src_flat[keep], dst_flat[keep], affinity[keep]


def transition_matrix(edge: torch.Tensor, radius: int = 5, beta: float = 10.0) -> torch.Tensor:
    """Sparse CSR ``Tᵀ`` (n×n) of the reference's column-normalised transition T = A^β / colsum(A^β).

    A is symmetric (pairs in both orientations, unit diagonal), so Tᵀ = D⁻¹·A^β: row i of the returned matrix
    holds column i of T, and ``Tᵀ @ X`` equals ``(Xᵀ · T)ᵀ``, one step of the reference's ``x · T``.
    """
    n = edge.shape[-2] * edge.shape[-1]
    src, dst, affinity = boundary_pairs(edge, radius)
    diag = torch.arange(n, device=edge.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    scaled = affinity.pow(beta)
    weights = torch.cat([scaled, scaled, torch.ones(n, device=edge.device, dtype=scaled.dtype)])
    degree = torch.zeros(n, device=edge.device, dtype=weights.dtype).index_add_(0, cols, weights)
    coo = torch.sparse_coo_tensor(
        torch.stack([cols, rows]), weights / degree[cols], (n, n), check_invariants=False
    ).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


def propagate_to_edge(
    cams: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> torch.Tensor:
    """Random-walk the (K, h, w) CAMs on the (h, w) boundary map: ``(x ⊙ (1 − E)) · T^(2^exp_times)``.

    CAM values on boundaries are suppressed before the walk (reference step 5). Returns (K, h, w).
    """
    num_maps, height, width = cams.shape
    edge = edge.reshape(height, width).to(cams.dtype)
    walker = transition_matrix(edge, radius, beta)
    x = (cams * (1 - edge)).reshape(num_maps, -1).T.contiguous()  # (n, K)
    for _ in range(2**exp_times):
        x = walker @ x
    return x.T.reshape(num_maps, height, width)


def propagate_to_edge_dense(
    cams: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> torch.Tensor:
    """The reference path: dense n×n A, T = A^β / colsum, ``exp_times`` squarings, then ``x · T``.

    O(n²) memory and O(n³) time: tests and the benchmark only.
    """
    num_maps, height, width = cams.shape
    n = height * width
    edge = edge.reshape(height, width).to(cams.dtype)
    src, dst, affinity = boundary_pairs(edge, radius)
    dense = torch.eye(n, device=cams.device, dtype=cams.dtype)
    dense[src, dst] = affinity
    dense[dst, src] = affinity
    trans = dense.pow(beta)
    trans = trans / trans.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    x = (cams * (1 - edge)).reshape(num_maps, n)
    return (x @ trans).reshape(num_maps, height, width)


def walk_to_label(
    walked: torch.Tensor, keys: np.ndarray, image_size: tuple[int, int], bg_threshold: float = 0.2, stride: int = 4
) -> np.ndarray:
    """Semantic pseudo label from walked stride-4 maps (docs/reference.md#stage-g-random-walk after the walk).

    Upsample ×``stride`` (bilinear, align_corners=False), crop to the image, divide by the GLOBAL max over all maps
    (one scalar, quirk docs/reference.md#q9-background-thresholds), prepend a constant background plane ``bg_threshold``, argmax, map through
    [0, keys + 1]. No 255 in the result. Maps whose global max is not positive give an all-background label.

    Args:
        walked: (K, h, w) walked maps; keys: (K,) 0-based class indices; image_size: (H, W).
        stride: image pixels per map cell: 4 (reference); 2 for a walk on the image upscaled ×2 (``pseudo.scale``).
    """
    height, width = image_size
    if walked.shape[0] == 0 or not bool((walked.max() > 0).item()):
        return np.zeros((height, width), dtype=np.uint8)
    up = F.interpolate(walked[:, None], scale_factor=stride, mode="bilinear", align_corners=False)[:, 0]
    up = up[:, :height, :width]
    up = up / up.max()
    planes = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_threshold)
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    return lookup[planes.argmax(dim=0).cpu().numpy()].astype(np.uint8)
