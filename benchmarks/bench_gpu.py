"""The GPU numbers the README lacks, in one command (≤ 5 min on one GPU), as JSON lines on stdout.

Random weights everywhere (no download). Each part runs its own benchmark script in a subprocess (its own CUDA
context and peak memory) at the reference's sizes:

* ``clims_step``: one CLIMS training step, batch 16, crop 512, ResNet-50 + ViT-B/32 (QuickGELU) in fp16, the
  reference's order of work (``naive``) vs the fused evaluator (``fused``) — bench_clims_step.py;
* ``cam_inference``: clims-infer's 4 scales × flip on 500×375 JPEGs, ResNet-50 — bench_cam_inference.py;
* ``random_walk``: the sparse walk vs the reference's dense one on a 500×375 image's grid — bench_random_walk.py.

    python benchmarks/bench_gpu.py                # every part on cuda
    python benchmarks/bench_gpu.py --device cpu --batch 2 --crop 64 --images 2 --walk-size 12x16   # dry run

Per-stage times of the whole pipeline come from the preflight (README "Before the real run").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parts(args: argparse.Namespace) -> dict[str, list[str]]:
    """Benchmark name → the command line of the script that measures it."""
    py = sys.executable
    return {
        "clims_step": [
            py,
            str(HERE / "bench_clims_step.py"),
            f"--device={args.device}",
            f"--batch={args.batch}",
            f"--crop={args.crop}",
            "--precision=fp16",
            "--clip-model=ViT-B-32-quickgelu",
            "--paths=naive,fused",
            f"--steps={args.steps}",
            "--warmup=2",
        ],
        "cam_inference": [
            py,
            str(HERE / "bench_cam_inference.py"),
            f"--device={args.device}",
            f"--images={args.images}",
            "--workers=4",
            "--skip=eval",
        ],
        "random_walk": [py, str(HERE / "bench_random_walk.py"), f"--device={args.device}", f"--size={args.walk_size}"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run the script")
    parser.add_argument("--batch", type=int, default=16, help="CLIMS step batch (reference 16)")
    parser.add_argument("--crop", type=int, default=512, help="CLIMS step crop (reference 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed CLIMS steps per path")
    parser.add_argument("--images", type=int, default=100, help="images for CAM inference")
    parser.add_argument("--walk-size", default="94x125", help="random-walk grid HxW (a 500×375 image)")
    parser.add_argument("--timeout", type=int, default=100, help="seconds allowed per part (3 parts: ≤ 5 min)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
            "`make bench` for the CPU benchmarks",
            file=sys.stderr,
        )
        return 2
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    failed = []
    for name, command in parts(args).items():
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(json.dumps({"bench": name, "error": f"timed out after {args.timeout} s", "gpu": gpu}), flush=True)
            failed.append(name)
            continue
        if proc.returncode:
            print(json.dumps({"bench": name, "error": proc.stderr.strip()[-2000:], "gpu": gpu}), flush=True)
            failed.append(name)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(json.dumps({"bench": name, "gpu": gpu, **json.loads(line)}), flush=True)
        print(f"# {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
