"""``clims-infer``: CAMs of a split from a trained checkpoint (the algorithm: :mod:`clims_pl.cams`)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from clims_pl.cams import predict_cams
from clims_pl.io import atomic_write_json
from clims_pl.models.checkpoint import load_net
from clims_pl.provenance import claim, digest, identity
from clims_pl.runtime import log, prepare_run


def run(cfg: DictConfig) -> Path:
    """``clims-infer``: CAMs of ``infer.split`` from checkpoint ``ckpt`` into ``infer.out_dir``; returns it.

    The folder is claimed for this checkpoint (its content hash), split, scales and network: a rerun of the same
    resumes, CAMs of another checkpoint there are refused unless ``overwrite=true`` (which recomputes them all).
    """
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("ckpt is required: clims-infer ckpt=<train run>/checkpoints/last.ckpt (or a state dict)")
    prepare_run(cfg)
    out_dir = Path(cfg.infer.out_dir)
    inputs = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "split": cfg.infer.split,
        "scales": list(cfg.data.scales),
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
    }
    record = {**inputs, "ckpt": identity(cfg.ckpt)}
    net = load_net(cfg.model.net, cfg.ckpt)
    claim(out_dir, record, what="CAMs", owned=("*.npz", "manifest.json"), overwrite=bool(cfg.get("overwrite")))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # generates the toy world when data=toy
    dataset = datamodule.predict_dataset(cfg.infer.split)
    stats = predict_cams(
        net, dataset, out_dir, cfg.trainer, batch_size=cfg.infer.batch_size, num_workers=cfg.infer.num_workers
    )
    if rank_zero_only.rank == 0:  # a re-launched DDP job runs this on every rank
        config_hash = digest(record)
        manifest = {"stage": "cams", "finished": True, "config_hash": config_hash, **inputs, **stats}
        atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("CAMs: %s", json.dumps(stats))
    return out_dir
