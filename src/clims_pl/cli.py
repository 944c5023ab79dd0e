"""Hydra entry points. Each is a thin shell: compose the config, hand it to one stage's ``run(cfg)``.

Every command takes Hydra overrides and ``--help`` (config groups and the composed config), e.g.
``clims-train experiment=toy_cam trainer.max_steps=20`` or ``clims-infer --help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clims_pl.config import CONF_DIR
from clims_pl.runtime import remove_unused_run_dir


def _entry(config_name: str, target: str) -> Callable[[], Any]:
    """Build a console-script function that runs ``target`` ('module:function') on the composed config."""
    module_name, func_name = target.split(":")

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        # The return value matters to optimising sweepers (Optuna reads it); plain runs ignore it.
        try:
            return getattr(importlib.import_module(module_name), func_name)(cfg)
        except BaseException:
            remove_unused_run_dir(Path(HydraConfig.get().runtime.output_dir))
            raise

    return main


train_main = _entry("train", "clims_pl.train:run")
infer_main = _entry("infer", "clims_pl.cams:run")
eval_main = _entry("eval", "clims_pl.evaluate:run")
viz_main = _entry("viz", "clims_pl.viz:run")
toyclip_main = _entry("toyclip", "clims_pl.toyclip:run")


def _flags_to_overrides(argv: list[str]) -> list[str]:
    """``--from STAGE`` / ``--only A,B`` (friendlier than Hydra keys) → ``pipeline.from_stage`` / ``pipeline.only``."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag.lstrip("+") == "data_root":  # the old spelling: Hydra would reject it, or ignore it with a `+`
            raise SystemExit(f"{arg}: the dataset folder is data.root, as on every command: data.root={value}")
        if flag in ("--from", "--only"):
            value = value or next(args, "")
            if not value:
                raise SystemExit(f"{flag} needs a stage name")
            key = "pipeline.from_stage" if flag == "--from" else "pipeline.only"
            out.append(f"{key}={value}" if flag == "--from" else f"{key}=[{value}]")
        else:
            out.append(arg)
    return out


_reproduce = _entry("reproduce", "clims_pl.pipeline:run_scored")


def reproduce_main() -> None:
    sys.argv[1:] = _flags_to_overrides(sys.argv[1:])
    _reproduce()


def demo_main() -> None:
    """``clims-demo`` = ``clims-reproduce experiment=toy_demo`` (+ any overrides): the offline end-to-end demo."""
    sys.argv[1:] = ["experiment=toy_demo", *_flags_to_overrides(sys.argv[1:])]
    _reproduce()
