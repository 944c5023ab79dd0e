"""Hydra/OmegaConf glue: where the configs live, the resolvers they use, and the range check of config values.

Importing this module registers the resolvers, so every entry point and test that composes configs
imports it first.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def _conf_dir() -> Path:
    """``CLIMS_CONF_DIR`` if set, else the configs shipped with the package.

    ``clims_pl/conf`` is a link to the repository's top-level ``conf/`` in a checkout (editable install, PYTHONPATH)
    and a copy of it in a wheel (package data), so every install finds its configs at the same place.
    """
    chosen = os.environ.get("CLIMS_CONF_DIR")
    if not chosen:
        return Path(__file__).resolve().parent / "conf"
    if not (Path(chosen) / "train.yaml").is_file():
        raise FileNotFoundError(
            f"CLIMS_CONF_DIR={chosen}: no train.yaml there; point it at a copy of clims-pl's conf/ folder or unset it"
        )
    return Path(chosen)


#: The Hydra config folder every entry point and the pipeline compose from.
CONF_DIR = _conf_dir()


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


def check_number(
    key: str,
    value: object,
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    hint: str = "",
) -> Any:
    """``value`` as a finite number (``int`` when ``integer``) within the bounds, else one ValueError naming ``key``.

    The constructors that configs instantiate call this on their arguments with the config key they come from
    (``loss.alpha``, ``data.batch_size``), so a wrong setting fails when the config is built, with the key and
    the allowed range, instead of training something else or crashing later without naming it.
    """
    bounds = [f"{op} {b:g}" for op, b in ((">=", ge), (">", gt), ("<", lt)) if b is not None]
    allowed = ("an integer" if integer else "a number") + (" " + " and ".join(bounds) if bounds else "")
    number = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)  # type: ignore[arg-type]
    ok = (
        number is not None
        and math.isfinite(number)
        and (not integer or number.is_integer())
        and (ge is None or number >= ge)
        and (gt is None or number > gt)
        and (lt is None or number < lt)
    )
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: it must be {allowed}{f' ({hint})' if hint else ''}")
    return int(number) if integer else number
