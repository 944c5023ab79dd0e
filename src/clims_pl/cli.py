"""Console scripts. Each is a thin shell: compose the config of one registry stage, hand it to that stage's ``run(cfg)``.

Every command takes Hydra overrides (``clims-train experiment=toy_cam trainer.max_steps=20``) and ``--help``: what
the command does, its config groups and their options, its flags (``clims-reproduce --from/--only``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clims_pl.config import CONF_DIR
from clims_pl.dashboard import publish
from clims_pl.runtime import remove_unused_run_dir
from clims_pl.stages import REGISTRY, stage_spec

#: Flags of clims-reproduce / clims-demo (friendlier than their Hydra keys), with their help line.
PIPELINE_FLAGS = {
    "--from": ("STAGE", "rerun this stage and every stage after it, even if up to date (pipeline.from_stage)"),
    "--only": ("A,B", "run only these stages; the others must have run already (pipeline.only)"),
}
#: Groups every root config has that say nothing about the command (Hydra's own settings).
HIDDEN_GROUPS = {"hydra"}


def _hydra_main(stage: str) -> Callable[[], Any]:
    """Hydra's main for the registry stage ``stage``: its root config, its ``run`` on the composed config."""
    spec = stage_spec(stage)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=spec.config)
    def main(cfg: DictConfig) -> Any:
        # The return value matters to optimising sweepers (Optuna reads it); plain runs ignore it.
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            result = spec.entry()(cfg)
        except BaseException:
            remove_unused_run_dir(run_dir)
            raise
        if stage != "reproduce":  # a pipeline publishes each of its stages itself
            publish(stage, run_dir, cfg)  # the stage's numbers, curves and pictures to its loggers
        return result

    return main


def _group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``conf/<group>/*.yaml``); experiments only those that fit the command."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _is_pipeline_experiment(name: str) -> bool:
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    return "\npipeline:" in text or "clims-reproduce" in text


def command_help(command: str, stage: str, preset: Sequence[str] = ()) -> str:
    """``--help`` of a console script: what it does (registry description), its groups with options, its flags."""
    from clims_pl.pipeline import default_groups  # the root config's defaults, read without composing

    spec = stage_spec(stage)
    pipeline = stage == "reproduce"
    lines = [
        f"{command}: {spec.description}",
        "",
        f"usage: {command} [KEY=VALUE ...]{' [--from STAGE] [--only A,B]' if pipeline else ''}",
        f"  KEY=VALUE are Hydra overrides of conf/{spec.config}.yaml"
        + (f" (preset: {' '.join(preset)})" if preset else ""),
        "",
        "config groups (GROUP=OPTION):",
    ]
    for group in sorted(default_groups(spec.config) - HIDDEN_GROUPS):
        options = _group_options(group)
        if group == "experiment":
            options = [o for o in options if _is_pipeline_experiment(o) == pipeline]
        lines.append(f"  {group}: {', '.join(options)}")
    if pipeline:
        lines += ["", "flags:", *(f"  {flag} {arg:<6} {text}" for flag, (arg, text) in PIPELINE_FLAGS.items())]
        lines.append("  preflight=true  every stage in miniature first: time, memory and precision per stage")
        lines.append(f"  stages an experiment can name (run: NAME): {', '.join(n for n in REGISTRY if n != stage)}")
    lines += [
        "",
        "more: --cfg job prints the composed config; --hydra-help lists Hydra's own options",
    ]
    return "\n".join(lines)


def flags_to_overrides(argv: list[str]) -> list[str]:
    """``--from STAGE`` / ``--only A,B`` (friendlier than Hydra keys) → ``pipeline.from_stage`` / ``pipeline.only``."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag.lstrip("+") == "data_root":  # the old spelling: Hydra would reject it, or ignore it with a `+`
            raise SystemExit(f"{arg}: the dataset folder is data.root, as on every command: data.root={value}")
        if flag in PIPELINE_FLAGS:
            value = value or next(args, "")
            if not value:
                raise SystemExit(f"{flag} needs a stage name")
            key = "pipeline.from_stage" if flag == "--from" else "pipeline.only"
            out.append(f"{key}={value}" if flag == "--from" else f"{key}=[{value}]")
        else:
            out.append(arg)
    return out


def _command(command: str, stage: str, preset: Sequence[str] = ()) -> Callable[[], Any]:
    """The console-script function ``command``: ``--help`` → :func:`command_help`, else Hydra on the arguments."""

    def entry() -> Any:
        argv = sys.argv[1:]
        if "--help" in argv or "-h" in argv:
            print(command_help(command, stage, preset))
            return None
        sys.argv[1:] = [*preset, *(flags_to_overrides(argv) if stage == "reproduce" else argv)]
        return _hydra_main(stage)()

    entry.__doc__ = f"``{command}``: {stage_spec(stage).description}."
    return entry


train_main = _command("clims-train", "train")
infer_main = _command("clims-infer", "cams")
eval_main = _command("clims-eval", "evaluate")
viz_main = _command("clims-viz", "viz")
toyclip_main = _command("clims-toyclip", "toyclip")
reproduce_main = _command("clims-reproduce", "reproduce")
#: ``clims-demo`` = ``clims-reproduce experiment=toy_demo`` (+ any overrides): the offline end-to-end demo.
demo_main = _command("clims-demo", "reproduce", preset=("experiment=toy_demo",))
