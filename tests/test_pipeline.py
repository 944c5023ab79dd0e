"""Stage pipeline: skip when current, rerun on deleted artifacts / changed config / --from / --only, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from clims_pl.pipeline import (
    Stage,
    check_plain_folder,
    compose_stage,
    config_hash,
    default_groups,
    hydra_value,
    logger_overrides,
    run,
    run_pipeline,
    set_overrides,
)
from clims_pl.stages import REGISTRY, StageSpec
from clims_pl.stages.reproduce import run_scored

CALLS: Counter[str] = Counter()
FAIL_ONCE: set[str] = set()


def fake_stage(cfg: DictConfig) -> dict[str, float]:
    """Writes out.txt = its seed (+ the upstream file if any); fails once after a partial write if asked."""
    out = Path(cfg.paths.output_dir)
    name = out.name
    CALLS[name] += 1
    (out / "partial.txt").write_text("half")
    if name in FAIL_ONCE:
        FAIL_ONCE.discard(name)
        raise KeyboardInterrupt("killed mid-stage")
    upstream = Path(cfg.get("upstream") or out.parent / "a") / "out.txt"
    (out / "out.txt").write_text(f"{cfg.seed}|{upstream.read_text() if name != 'a' else ''}")
    return {"value": float(cfg.seed)}


def _stages(seed_b: int = 1) -> list[Stage]:
    def st(name: str, after: tuple[str, ...], seed: int) -> Stage:
        return Stage(name, "reproduce", "test_pipeline:fake_stage", after, (f"seed={seed}",), ("out.txt",))

    return [st("a", (), 0), st("b", ("a",), seed_b), st("c", ("b",), 2)]


@pytest.fixture(autouse=True)
def _reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "fake", StageSpec("reproduce", "test_pipeline:fake_stage", "a test stage"))
    CALLS.clear()
    FAIL_ONCE.clear()


def test_second_run_skips_every_stage(tmp_path: Path) -> None:
    first = run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 1, "c": 1}
    second = run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 1, "c": 1}
    assert second == first
    assert first["b"]["metrics"] == {"value": 1.0}
    assert first["c"]["inputs"] == {"b": first["b"]["outputs_fingerprint"]}


def test_deleted_artifact_reruns_that_stage_and_dependants(tmp_path: Path) -> None:
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    (tmp_path / "run" / "b" / "out.txt").unlink()
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 2, "c": 2}


def test_changed_config_wipes_and_reruns(tmp_path: Path) -> None:
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    stray = tmp_path / "run" / "b" / "stray.bin"
    stray.write_text("from the old config")
    run_pipeline(_stages(seed_b=7), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 2, "c": 2}
    assert not stray.exists()
    assert (tmp_path / "run" / "b" / "out.txt").read_text().startswith("7|")


def test_changed_inputs_or_from_empty_the_stage_folder(tmp_path: Path) -> None:
    """New inputs (or --from) clear a stage's folder, not only its own config change: files of the old inputs
    would otherwise be skipped by per-image stages and "resumed" by training stages."""
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    stray = tmp_path / "run" / "c" / "stray.bin"
    stray.write_text("derived from b's old output")
    run_pipeline(_stages(seed_b=7), tmp_path / "run", tmp_path)  # c's config is the same, its input is not
    assert CALLS == {"a": 1, "b": 2, "c": 2} and not stray.exists()
    stray.write_text("again")
    run_pipeline(_stages(seed_b=7), tmp_path / "run", tmp_path, from_stage="c")
    assert CALLS["c"] == 3 and not stray.exists()


def test_killed_stage_runs_again_and_later_stages_follow(tmp_path: Path) -> None:
    FAIL_ONCE.add("b")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert not (tmp_path / "run" / "b" / "manifest.json").exists()
    done = tmp_path / "run" / "b" / "done_before_the_kill.bin"
    done.write_text("work of the same config and inputs")
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 2, "c": 1}
    assert done.is_file()  # resumed in its folder, not emptied


def test_from_and_only(tmp_path: Path) -> None:
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    run_pipeline(_stages(), tmp_path / "run", tmp_path, from_stage="b")
    assert CALLS == {"a": 1, "b": 2, "c": 2}
    run_pipeline(_stages(), tmp_path / "run", tmp_path, only=["a"])
    assert CALLS == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="unknown stage 'z'"):
        run_pipeline(_stages(), tmp_path / "run", tmp_path, from_stage="z")


def test_dependency_order_is_checked(tmp_path: Path) -> None:
    a, b, c = _stages()
    with pytest.raises(ValueError, match="must come earlier"):
        run_pipeline([b, a, c], tmp_path / "run", tmp_path)


def test_set_overrides_flatten_and_round_trip() -> None:
    settings = {
        "loss": {"alpha": 1, "enable_btm": False},
        "data.scales": [1.0, 0.5],
        "clip": "tiny",
        "ckpt": "/runs/0_a=1,b=2/last.ckpt",
        "model": {"init_ckpt": None},
        "label": "true",
        "rows": [{"stage": "eval", "label": "CAM, best"}],
    }
    out = set_overrides(settings)
    assert out == [
        "loss.alpha=1",
        "loss.enable_btm=false",
        "data.scales=[1.0,0.5]",
        "clip=tiny",
        "ckpt='/runs/0_a=1,b=2/last.ckpt'",
        "model.init_ckpt=null",
        "label='true'",
        "rows=[{stage:eval,label:'CAM, best'}]",
    ]
    parser = OverridesParser.create()
    parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(out)}
    assert parsed["ckpt"] == settings["ckpt"] and parsed["label"] == "true" and parsed["data.scales"] == [1.0, 0.5]
    assert parsed["rows"] == settings["rows"]
    for text in ["it's", "c:\\dir\\", "1e-4", ""]:
        assert parser.parse_override(f"k={hydra_value(text)}").value() == text


def _pipeline_cfg(tmp_path: Path, stages: dict, extra: tuple[str, ...] = ()) -> DictConfig:
    cfg = compose_config("reproduce", tmp_path, [f"run_dir={tmp_path / 'run'}", *extra])
    with open_dict(cfg):
        cfg.pipeline.stages = stages
    return cfg


def _fake(seed: int, after: tuple[str, ...] = (), **extra: object) -> dict:
    return {
        "run": "fake",
        "after": list(after),
        "overrides": [f"seed={seed}"],
        "outputs": ["out.txt"],
        **extra,
    }


def test_pipeline_set_reaches_inside_a_stage(tmp_path: Path) -> None:
    stages = {"a": _fake(0), "b": _fake(1, ("a",))}
    cfg = _pipeline_cfg(tmp_path, stages)
    with open_dict(cfg):
        cfg.pipeline.set = {"b": {"seed": 5}}
    manifests = run(cfg)
    assert manifests["b"]["metrics"] == {"value": 5.0}  # appended after the stage's own seed=1
    with open_dict(cfg):
        cfg.pipeline.set.b.seed = 6
    assert run(cfg)["b"]["metrics"] == {"value": 6.0}
    assert CALLS == {"a": 1, "b": 2}  # a changed setting reruns that stage only
    with open_dict(cfg):
        cfg.pipeline.set = {"z": {"seed": 1}}
    with pytest.raises(ValueError, match=r"pipeline.set: no stage named \['z'\]"):
        run(cfg)


def test_shared_stage_dir_runs_once_across_run_dirs(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "a"

    def stages(seed_a: int = 0) -> list[Stage]:
        a = Stage("a", "reproduce", "test_pipeline:fake_stage", (), (f"seed={seed_a}",), ("out.txt",), str(shared))
        up = (f"+upstream={shared}",)
        b = Stage("b", "reproduce", "test_pipeline:fake_stage", ("a",), ("seed=1", *up), ("out.txt",))
        return [a, b]

    first = run_pipeline(stages(), tmp_path / "job0", tmp_path)
    second = run_pipeline(stages(), tmp_path / "job1", tmp_path)
    assert CALLS == {"a": 1, "b": 2}
    assert second["a"] == first["a"] and not (tmp_path / "job0" / "a").exists()
    assert (tmp_path / "job1" / "b" / "out.txt").read_text() == "1|0|"
    assert (tmp_path / "shared" / ".a.lock").is_file()
    with pytest.raises(RuntimeError, match=r"shared stage 'a'.*runs sharing a stage must not change it"):
        run_pipeline(stages(seed_a=3), tmp_path / "job2", tmp_path)
    assert (shared / "out.txt").read_text() == "0|"  # the shared result survived
    with pytest.raises(ValueError, match="must be an absolute folder"):
        Stage.from_config("a", OmegaConf.create({**_fake(0), "dir": "relative/a"}))


def test_sweep_folder_names_must_survive_hydra(tmp_path: Path) -> None:
    check_plain_folder("run_dir", tmp_path / "multirun" / "3_ablation-otm_btm__loss.alpha-5")
    with pytest.raises(ValueError, match=r"run_dir=.*0_a=1,b=2.*hydra.sweep.subdir"):
        check_plain_folder("run_dir", tmp_path / "0_a=1,b=2")


def test_logger_for_stages_with_a_logger_group(tmp_path: Path) -> None:
    assert {"data", "logger"} <= default_groups("train") and "logger" not in default_groups("reproduce")
    assert logger_overrides("train", "wandb", "sweep_7") == ["logger=wandb", "logger.wandb.group=sweep_7"]
    assert logger_overrides("eval", "csv", "sweep_7", "eval_cams") == ["logger=csv"]
    assert logger_overrides("reproduce", "wandb", "sweep_7") == [] and logger_overrides("train", None, "g") == []
    # Every stage reaches the logger (each root config has a logger group); on wandb one run per stage.
    for config in ("train", "infer", "eval", "refine", "report", "demo", "toyclip"):
        assert logger_overrides(config, "wandb", "g", "cams") == [
            "logger=wandb",
            "logger.wandb.group=g",
            "logger.wandb.name=cams",
            "logger.wandb.job_type=cams",
        ], config
    stage = Stage("s", "train", "x:y", (), ("experiment=toy_cam",), ())
    wandb = Stage("s", "train", "x:y", (), ("experiment=toy_cam", *logger_overrides("train", "wandb", "g")), ())
    seeded = Stage("s", "train", "x:y", (), ("experiment=toy_cam", "seed=1"), ())
    hashes = [config_hash(compose_stage(s, tmp_path / "s", tmp_path, [])) for s in (stage, wandb, seeded)]
    # Where a stage logs leaves its result (and so its manifest) alone; a real setting does not.
    assert hashes[0] == hashes[1] != hashes[2]
    assert compose_stage(wandb, tmp_path / "s", tmp_path, []).logger.wandb.group == "g"


def test_objective_is_read_from_a_stage_manifest(tmp_path: Path) -> None:
    """What `+hparams_search=...` (Optuna) maximises: pipeline.objective = "<stage>:<metric key>"."""
    cfg = _pipeline_cfg(tmp_path, {"a": _fake(0), "b": _fake(7, ("a",))})
    assert run_scored(cfg) is None  # no objective: a plain run
    with open_dict(cfg):
        cfg.pipeline.objective = "b:value"
    assert run_scored(cfg) == 7.0
    for spec, message in [("z:value", "no stage 'z'"), ("b:miou", "no number at 'miou' in b's metrics \\(value\\)")]:
        with open_dict(cfg):
            cfg.pipeline.objective = spec
        with pytest.raises(ValueError, match=message):
            run_scored(cfg)
