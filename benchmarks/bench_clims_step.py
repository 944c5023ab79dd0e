"""One CLIMS training step, reference order vs fused, on random weights (no download): JSON lines on stdout.

Paths (each measured in its own subprocess, so peak RSS is not shared):

* ``naive``: the reference's order of work (3K image encodes, text re-encoded per step, CLIP gradients on).
* ``fused``: the default evaluator (2K image encodes in one pass, cached text, frozen CLIP).
* ``fused_bf16``: the same with CLIP in bf16.
* ``limit``: a floor for any implementation: backbone forward/backward, the 2K masked crops through the CLIP image
  encoder once (forward + input gradient) and the optimiser step; no text, no similarities, no losses.

A step is: CAMNet forward, objective, backward, SGD step, lr schedule step. ``ratio_naive_over_fused`` is added to
the fused lines. Example: ``python benchmarks/bench_clims_step.py --steps 3 --batch 4 --crop 224``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clims_pl.losses import ClimsObjective
from clims_pl.models.cam_net import CAMNet
from clims_pl.models.clip_evaluator import ClipEvaluator
from clims_pl.optim import poly_sgd
from clims_pl.prompts.bank import load_prompt_bank

PATHS = ("naive", "fused", "fused_bf16", "limit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of %(default)s")
    parser.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip architecture (random init)")
    parser.add_argument("--precision", default="fp32", help="CLIP precision of naive/fused/limit (fp32|fp16|bf16)")
    parser.add_argument("--backbone", default="resnet50", help="CAMNet timm backbone (random init)")
    parser.add_argument("--crop", type=int, default=224, help="training crop side")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (text caching happens here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: measure one path here
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    return args


def synthetic_batch(args: argparse.Namespace, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images and 1–3 positive classes per image."""
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=g)
    labels = torch.zeros(args.batch, num_classes)
    for row in labels:
        k = int(torch.randint(1, 4, (1,), generator=g))
        row[torch.randperm(num_classes, generator=g)[:k]] = 1
    return images.to(args.device), labels.to(args.device)


def build_step(args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """The training step of ``args.path`` (a closure over net, optimiser, CLIP, inputs) and its pair count K."""
    torch.manual_seed(args.seed)
    bank = load_prompt_bank("voc")
    net = CAMNet(args.backbone, num_classes=len(bank.classes), pretrained=False, bn_mode="train").to(args.device)
    backbone, classifier = net.param_groups()
    optim = poly_sgd(
        [{"params": backbone, "lr": 2.5e-4}, {"params": classifier, "lr": 2.5e-3}],
        weight_decay=1e-4,
        max_steps=1000,
    )
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    precision = "bf16" if args.path == "fused_bf16" else args.precision
    evaluator = ClipEvaluator(args.clip_model, pretrained=None, precision=precision, fused=args.path != "naive")
    objective = ClimsObjective(evaluator).to(args.device)
    objective.set_prompt_bank(bank)
    images, labels = synthetic_batch(args, len(bank.classes))

    def loss() -> torch.Tensor:
        maps = torch.sigmoid(net(images))
        if args.path != "limit":
            return objective(maps, images, labels)["total"]
        n_idx, c_idx = labels.nonzero(as_tuple=True)
        size = (evaluator.input_size, evaluator.input_size)
        cams = F.interpolate(maps[n_idx, c_idx].unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        imgs = F.interpolate(images, size=size, mode="bilinear", align_corners=True)[n_idx]
        crops = torch.cat([cams * imgs, (1 - cams) * imgs]).to(evaluator.dtype)
        return evaluator.clip.encode_image(crops).float().sum() + maps.mean()

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        scheduler.step()

    return step, int(labels.sum())


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    import_rss = _peak_rss_mb()  # torch + open_clip + timm alone are most of a GB
    step, pairs = build_step(args)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        start = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "path": args.path,
        "sec_per_step_median": round(median, 4),
        "sec_per_step_min": round(min(times), 4),
        "images_per_sec": round(args.batch / median, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "import_rss_mb": import_rss,
        "clip_model": args.clip_model,
        "precision": "bf16" if args.path == "fused_bf16" else args.precision,
        "backbone": args.backbone,
        "crop": args.crop,
        "batch": args.batch,
        "pairs": pairs,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.path:
        print(json.dumps(measure(args)), flush=True)
        return
    results = []
    for path in args.paths.split(","):
        if path not in PATHS:
            raise SystemExit(f"--paths: unknown path {path!r}; choose from {', '.join(PATHS)}")
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--path", path], capture_output=True, text=True, check=False
        )
        if proc.returncode:
            raise SystemExit(f"benchmark path {path} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    naive = next((r["sec_per_step_median"] for r in results if r["path"] == "naive"), None)
    for result in results:
        if naive is not None and result["path"].startswith("fused"):
            result["ratio_naive_over_fused"] = round(naive / result["sec_per_step_median"], 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
