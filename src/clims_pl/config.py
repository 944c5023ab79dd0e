"""Hydra/OmegaConf glue: where the configs live and the resolvers they use.

Importing this module registers the resolvers, so every entry point and test that composes configs
imports it first.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

#: ``conf/`` at the repository root (src layout, editable install). ``CLIMS_CONF_DIR`` overrides it for
#: installs that keep the configs elsewhere.
CONF_DIR = Path(os.environ.get("CLIMS_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))


def _register() -> None:
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda x: len(x))
    # ${cwd:} = the launch directory (hydra.job.chdir is false). Not ${hydra:runtime.cwd}: a multirun's sweeper
    # resolves hydra.sweep.dir before HydraConfig exists, so that interpolation fails there ("HydraConfig was
    # not set") and `clims-reproduce -m ...` could not start without CLIMS_ROOT.
    # ${if_set:${x},a,b} = a when x is set (not null/empty), else b: one input choosing several settings
    # (experiment=paper_voc_seg: a deeplab_init file selects the Caffe trunk, its weights and its normalisation).
    if not OmegaConf.has_resolver("if_set"):
        OmegaConf.register_new_resolver("if_set", lambda value, then, otherwise: then if value else otherwise)
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)


_register()
