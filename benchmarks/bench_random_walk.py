"""Sparse random walk vs the reference's dense n×n squaring (quirk docs/reference.md#q16-dense-random-walk), as one JSON line on stdout.

A seeded synthetic scene on the stride-4 grid of a 500×375 VOC image (94×125 = 11,750 nodes): K blob-shaped
CAMs (smooth falloff + noise) and a boundary map that is high on the blob outlines and low elsewhere. Both
paths walk the same CAMs (radius 5, β 10, 2⁸ steps) and turn them into labels exactly as the pseudo-label
stage does (×4 upsample, global max, background 0.2, argmax). Reported: label agreement (% of pixels), the
max |difference| of the globally normalised walked maps, and wall times. Target: ≥ 50× on the CPU.
The dense path needs ~3 × n² × 4 bytes (1.7 GB at the default size) and 8 n³ matmuls: minutes on 2 cores.

    python benchmarks/bench_random_walk.py                 # 94×125, K = 3, CPU
    python benchmarks/bench_random_walk.py --size 47x63    # quicker
    python benchmarks/bench_random_walk.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from clims_pl.refine.random_walk import propagate_to_edge, propagate_to_edge_dense, walk_to_label


def synthetic_scene(height: int, width: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, h, w) CAMs in [0, 1] and an (h, w) boundary map in (0, 1) with blobs of K classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cams = np.zeros((k, height, width))
    inside = np.zeros((k, height, width), dtype=bool)
    for c in range(k):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        dist = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        inside[c] = dist < 1
        cams[c] = np.exp(-2 * dist**2) * rng.uniform(0.6, 1.0) + 0.1 * rng.random((height, width))
    cams /= cams.max(axis=(1, 2), keepdims=True)
    outline = np.zeros((height, width), dtype=bool)
    for region in inside:
        outline |= region ^ np.roll(region, 1, axis=0)
        outline |= region ^ np.roll(region, 1, axis=1)
    edge = np.where(outline, 0.9, 0.05) + 0.05 * rng.random((height, width))
    return torch.from_numpy(cams).float(), torch.from_numpy(edge.clip(0, 0.99)).float()


def _timed(func, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = func()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="94x125", help="stride-4 grid HxW (default: a 500×375 image)")
    parser.add_argument("--k", type=int, default=3, help="number of CAM channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as the reference intends (docs/reference.md#q11-tf32)
    cams, edge = synthetic_scene(height, width, args.k, args.seed)
    cams, edge = cams.to(device), edge.to(device)
    keys = np.arange(args.k)
    image_size = (4 * height, 4 * width)

    propagate_to_edge(cams[:, :8, :8], edge[:8, :8])  # warm-up (kernels, allocator)
    sparse, sparse_s = _timed(lambda: propagate_to_edge(cams, edge), device)
    dense, dense_s = _timed(lambda: propagate_to_edge_dense(cams, edge), device)
    sparse_label = walk_to_label(sparse, keys, image_size)
    dense_label = walk_to_label(dense, keys, image_size)
    record = {
        "bench": "random_walk",
        "size": [height, width],
        "nodes": height * width,
        "k": args.k,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "agreement_pct": round(100.0 * float((sparse_label == dense_label).mean()), 4),
        "max_abs_diff": float((sparse / sparse.max() - dense / dense.max()).abs().max()),
        "dense_s": round(dense_s, 3),
        "sparse_s": round(sparse_s, 3),
        "speedup": round(dense_s / sparse_s, 1),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
