"""Ablation sweeps: the aggregated table (hand-made sweep, wandb offline), the sweep configs as `make ablation`
composes them, and a real 2-job toy multirun at CI size whose table is read back from the jobs' files."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from test_demo import _tiny

from clims_pl.ablation import aggregate, find_jobs, main, seed_table, wandb_target
from clims_pl.config import CONF_DIR
from clims_pl.pipeline import compose_stage, stages_from_config

REPO = Path(__file__).resolve().parents[1]
PAPER_ORDER = ["otm", "otm_btm", "otm_btm_reg", "otm_btm_reg_cbs"]


def _write_yaml(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj))


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_job(sweep: Path, folder: str, num: int, variant: str, metrics: dict | None, cobg: float | None) -> Path:
    """A job folder as Hydra + the pipeline leave it: .hydra/{hydra,overrides}.yaml, config.yaml, stage manifests."""
    job = sweep / folder
    labels = {"otm": "OTM", "otm_btm": "OTM+BTM", "otm_btm_reg_cbs": "OTM+BTM+REG+CBS"}
    _write_yaml(job / ".hydra" / "hydra.yaml", {"hydra": {"job": {"num": num}}})
    _write_yaml(job / ".hydra" / "overrides.yaml", ["experiment=toy_ablation", f"ablation={variant}"])
    stage = {"run": "evaluate"}
    config = {
        "run_dir": str(job),
        "ablation": {"label": labels[variant]},
        "ablation_sweep": {"title": "toy loss ablation", "eval_stage": "eval_clims", "demo_stage": "demo"},
        "pipeline": {"stages": {"eval_clims": stage, "demo": {**stage, "dir": str(sweep / f"demo{num}")}}},
    }
    _write_yaml(job / "config.yaml", config)
    if metrics is not None:
        _write_json(job / "eval_clims" / "manifest.json", {"finished": True, "metrics": metrics})
    if cobg is not None:
        _write_json(sweep / f"demo{num}" / "manifest.json", {"finished": True, "metrics": {"clims_cobg_fa": cobg}})
    return job


def _hand_made_sweep(sweep: Path) -> None:
    # Folders sort differently from job numbers: rows must follow the job numbers (the sweep's order).
    _fake_job(sweep, "b_last", 2, "otm_btm_reg_cbs", None, None)  # died before its evaluation
    _fake_job(
        sweep,
        "c_first",
        0,
        "otm",
        {
            "best_miou": 0.4012,
            "best_threshold": 0.2,
            "miou": 0.38,
            "threshold": 0.15,
            "sweep": {"threshold": [0.15, 0.2], "miou": [0.38, 0.4012]},
        },
        31.5,
    )
    _fake_job(
        sweep, "a_mid", 1, "otm_btm", {"best_miou": 0.45, "best_threshold": 0.25, "miou": 0.4, "threshold": 0.15}, 20.0
    )


def test_table_from_a_hand_made_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _hand_made_sweep(sweep)
    main([str(sweep), "--no-wandb"])
    rows = list(csv.DictReader((sweep / "ablation.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["ablation"] for r in rows] == ["OTM", "OTM+BTM", "OTM+BTM+REG+CBS"]
    assert float(rows[0]["miou_best"]) == pytest.approx(40.12)
    assert float(rows[1]["miou"]) == pytest.approx(40.0)
    assert float(rows[1]["cobg_fa"]) == pytest.approx(20.0)
    assert math.isnan(float(rows[2]["miou_best"])) and rows[2]["status"] == "eval_clims not finished; demo not finished"
    md = (sweep / "ablation.md").read_text()
    assert md.startswith("# toy loss ablation\n")
    assert "| job | ablation | CAM mIoU best (thr) | CAM mIoU @ 0.15 | co-occurring-bg false activation (%) |" in md
    assert "| 0 | OTM | 40.1 (0.20) | 38.0 | 31.5 |" in md
    assert "| 2 (eval_clims not finished; demo not finished) | OTM+BTM+REG+CBS | — (—) | — | — |" in md
    assert "![CAM threshold sweep per job](cam_sweep.png)" in md and (sweep / "cam_sweep.png").stat().st_size > 0


def test_cli_help_and_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "ablation.md" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no job folders"):
        main([str(tmp_path)])


def test_wandb_table_offline(tmp_path: Path) -> None:
    """Jobs whose stages logged to wandb: the table goes to their group (WANDB_MODE=offline from conftest)."""
    sweep = tmp_path / "sweep"
    _hand_made_sweep(sweep)
    logger = {"wandb": {"project": "clims-pl", "group": "toy_ablation_t0", "offline": True}}
    _write_yaml(sweep / "c_first" / "eval_clims" / "config.yaml", {"logger": logger})  # as a training stage writes
    result = aggregate(sweep)
    assert wandb_target(find_jobs(sweep)) == {"project": "clims-pl", "group": "toy_ablation_t0", "offline": True}
    tables = list(result["wandb_run"].glob("files/media/table/ablation_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["job", "ablation"]
    assert [row[:2] for row in table["data"]] == [[0, "OTM"], [1, "OTM+BTM"], [2, "OTM+BTM+REG+CBS"]]
    assert table["data"][0][table["columns"].index("miou_best")] == pytest.approx(40.12)
    assert table["data"][2][table["columns"].index("miou_best")] is None


def _makefile_args(*make_args: str) -> list[str]:
    """The clims-reproduce arguments of ``make <make_args>``, as make expands them (``make -n``: printed, not run)."""
    printed = subprocess.run(
        ["make", "-n", "-C", str(REPO), "BIN=bin", "STAMP=", *make_args], capture_output=True, text=True, check=True
    ).stdout
    words = shlex.split(next(line for line in printed.splitlines() if "clims-reproduce" in line))
    return words[words.index("bin/clims-reproduce") + 1 :]


def test_make_ablation_composes(tmp_path: Path) -> None:
    """`make ablation data.root=...` = the 4 loss variants in the paper's order, each job's stages reading data.root."""
    args = _makefile_args("ablation", "data.root=/data/VOC2012")
    assert args[0] == "-m"
    base = [*args[1:], f"paths.root_dir={tmp_path}", f"run_dir={tmp_path}/job"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("reproduce", overrides=base, return_hydra_config=True)
        assert str(cfg.hydra.sweeper.params.ablation).split(",") == PAPER_ORDER
        assert cfg.hydra.callbacks.ablation_table._target_ == "clims_pl.ablation.AblationTable"
        enabled = {}
        for variant in PAPER_ORDER:
            job = compose("reproduce", overrides=[*base, f"ablation={variant}"])
            stages = {s.name: s for s in stages_from_config(job.pipeline)}
            assert list(stages) == ["cam", "clims", "cams", "eval_cams"]
            assert stages["cam"].dir == f"{tmp_path}/runs/voc_ablation_shared/cam"
            clims = compose_stage(stages["clims"], tmp_path / "job" / "clims", tmp_path, [])
            assert clims.model.init_ckpt == f"{tmp_path}/runs/voc_ablation_shared/cam/checkpoints/last.ckpt"
            loss = clims.loss
            enabled[variant] = [loss.enable_otm, loss.enable_btm, loss.enable_reg, loss.enable_cbs]
            assert (loss.alpha, loss.beta, loss.gamma, loss.delta) == (10.0, 24.0, 1.0, 0.2)
            cams = compose_stage(stages["cams"], tmp_path / "job" / "cams", tmp_path, [])
            assert cams.infer.split == "train"
            for stage in stages.values():
                assert compose_stage(stage, tmp_path / stage.name, tmp_path, []).data.root == "/data/VOC2012"
    assert enabled == {
        "otm": [True, False, False, False],
        "otm_btm": [True, True, False, False],
        "otm_btm_reg": [True, True, True, False],
        "otm_btm_reg_cbs": [True, True, True, True],
    }


def test_weight_grid_reaches_the_clims_stage(tmp_path: Path) -> None:
    """Each key of the weight grid exists (no `+` needed) and lands in the clims stage's loss."""
    base = ["experiment=ablation_weights", f"paths.root_dir={tmp_path}", f"run_dir={tmp_path}/job"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        params = compose("reproduce", overrides=base, return_hydra_config=True).hydra.sweeper.params
        grid = {k.rsplit(".", 1)[1]: [float(v) for v in str(params[k]).split(",")] for k in params if "loss" in k}
        assert grid == {
            "alpha": [5, 10, 20],
            "beta": [12, 24, 48],
            "gamma": [0.5, 1, 2],
            "delta": [0.1, 0.2, 0.4],
        }
        assert params.ablation == "otm_btm_reg_cbs"
        picked = [f"pipeline.set.clims.loss.{k}={v[0]}" for k, v in grid.items()]
        job = compose("reproduce", overrides=[*base, *picked])
        clims = next(s for s in stages_from_config(job.pipeline) if s.name == "clims")
        loss = compose_stage(clims, tmp_path / "clims", tmp_path, []).loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.delta) == (5.0, 12.0, 0.5, 0.1)
    assert loss.enable_btm and loss.enable_cbs


def _ci_experiment(folder: Path, toy_root: Path) -> None:
    """experiment=toy_ablation_ci: toy_ablation shrunk as tests/test_demo.py does (through pipeline.set), on the
    session's toy world, one inference scale, and the random tiny CLIP instead of training the toy CLIP."""
    probe = compose_config("reproduce", folder, ["experiment=toy_ablation", f"run_dir={folder}"])
    shrink: dict[str, dict] = {}
    for name in probe.pipeline.stages:
        pairs = (o.split("=", 1) for o in _tiny(name) if not o.startswith("clip."))
        shrink[name] = {key: yaml.safe_load(value) for key, value in pairs}
        shrink[name].update({"data.root": str(toy_root), "data.scales": [1.0]})
    shrink["clims"].update({"clip": "tiny", "trainer.max_steps": 2})
    del shrink["toyclip"]
    text = "# @package _global_\n" + yaml.safe_dump(
        {
            "defaults": ["toy_ablation", "_self_"],
            "pipeline": {"set": shrink, "stages": {"toyclip": None, "clims": {"after": ["cam"]}}},
        }
    )
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "toy_ablation_ci.yaml").write_text(text)


@pytest.mark.slow
def test_toy_grid_two_jobs(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clims-reproduce -m experiment=toy_ablation ablation=otm,otm_btm_reg_cbs pipeline.logger=wandb` at CI size,
    in this process (wandb offline)."""
    from clims_pl.cli import reproduce_main

    _ci_experiment(tmp_path / "conf", toy_root)
    # No hydra.sweep.dir / paths.root_dir / CLIMS_ROOT: the default sweep folder under the launch directory must
    # resolve in the sweeper (it once used ${hydra:runtime.cwd}, unset there, and every real multirun failed).
    monkeypatch.delenv("CLIMS_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = [
        "clims-reproduce",
        "-m",
        "experiment=toy_ablation_ci",
        "ablation=otm,otm_btm_reg_cbs",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "print_config=false",
        "pipeline.logger=wandb",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        reproduce_main()
    finally:
        GlobalHydra.instance().clear()
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    out = capsys.readouterr().out
    # The shared baseline ran once (job 0) and was skipped by its manifest in job 1.
    assert out.count("✓ cam up to date") == 1 and out.count("✓ eval_cam up to date") == 1
    shared = tmp_path / "runs" / "toy_ablation_shared"
    assert (shared / "cam" / "manifest.json").is_file() and not list(sweep.glob("*/cam"))
    rows = list(csv.DictReader((sweep / "ablation.csv").open()))
    assert [(r["job"], r["ablation"], r["status"]) for r in rows] == [
        ("0", "OTM", "ok"),
        ("1", "OTM+BTM+REG+CBS", "ok"),
    ]
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == sweep
        cams = json.loads((run_dir / "eval_clims" / "metrics" / "cams.json").read_text())
        demo = json.loads((run_dir / "demo" / "demo_results.json").read_text())
        assert float(row["miou_best"]) == pytest.approx(100 * cams["best_miou"])
        assert float(row["best_threshold"]) == pytest.approx(cams["best_threshold"])
        assert float(row["miou"]) == pytest.approx(100 * cams["miou"]) and float(row["threshold"]) == 0.15
        assert float(row["cobg_fa"]) == pytest.approx(demo["clims_cobg_fa"])
        config = OmegaConf.load(run_dir / "clims" / "config.yaml")
        assert config.loss.enable_btm == (row["ablation"] != "OTM")
    assert (sweep / "ablation.md").read_text().count("\n| ") == 3  # header + 2 jobs
    # Every wandb run of the sweep (the shared baseline's, each job's) is in one group; the table went there too.
    configs = [shared / "cam", *(Path(r["run_dir"]) / "clims" for r in rows)]
    assert {OmegaConf.load(c / "config.yaml").logger.wandb.group for c in configs} == {f"toy_ablation_{sweep.name}"}
    table = next(sweep.glob("wandb/offline-run-*/files/media/table/ablation_*.table.json"))
    assert len(json.loads(table.read_text())["data"]) == 2


#: SlurmQueueConf fields of hydra-submitit-launcher 1.2.0 (not installed here): the yaml replaces that schema.
SUBMITIT_SLURM_FIELDS = {
    "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
    "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude", "gres",
    "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout",
    "additional_parameters", "array_parallelism", "setup",
}  # fmt: skip


def test_submitit_launcher_config_composes_without_the_plugin(tmp_path: Path) -> None:
    overrides = ["experiment=ablation_losses", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}/sweep"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("reproduce", overrides=[*overrides, f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert set(launcher) == SUBMITIT_SLURM_FIELDS
    assert launcher.submitit_folder == f"{tmp_path}/sweep/.submitit/%j"
    # One pipeline run per GPU (docs/reference.md#q6-trainable-batchnorm: CLIMS's BN batch of 16 on one device); the reference's 12 CPU workers.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.cpus_per_task) == (1, 1, 1, 12)
    assert launcher.timeout_min == 1440 and launcher.partition is None


def test_optuna_search_config_fits_the_weight_sweep(tmp_path: Path) -> None:
    """hydra-optuna-sweeper is not installed here: its config is checked against the experiment it searches."""
    search = OmegaConf.load(CONF_DIR / "hparams_search" / "clims_optuna.yaml")
    assert OmegaConf.to_container(search.defaults) == [{"override /hydra/sweeper": "optuna"}]
    sweeper = search.hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    cfg = compose_config("reproduce", tmp_path, ["experiment=ablation_weights", f"run_dir={tmp_path}/job"])
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key  # overridable without '+'
    objective = OmegaConf.to_container(search.pipeline)["objective"]  # unresolved: it points into the experiment
    with open_dict(cfg):
        cfg.pipeline.objective = objective
    assert cfg.pipeline.objective == "eval_cams:best_miou"


def _seed_job(sweep: Path, seed: int, results: dict | None) -> None:
    job = sweep / f"seed{seed}"
    _write_yaml(job / ".hydra" / "hydra.yaml", {"hydra": {"job": {"num": seed}}})
    _write_yaml(job / ".hydra" / "overrides.yaml", ["experiment=toy_demo_seeds", f"seed={seed}"])
    _write_yaml(job / "config.yaml", {"run_dir": str(job), "pipeline": {"stages": {"demo": {"run": "demo"}}}})
    if results is not None:
        _write_json(job / "demo" / "demo_results.json", results)


def test_seed_table_mean_and_sd_by_hand(tmp_path: Path) -> None:
    base = {"baseline_miou": 30.0, "all_background_miou": 17.0, "baseline_cobg_fa": 40.0, "clims_cobg_fa": 2.0}
    _seed_job(tmp_path, 0, {**base, "clims_miou": 70.0, "pseudo_miou": 74.0, "seg_val_miou": 70.0})
    context = {"with_cobg": 90.0, "without_cobg": 40.0, "per_class": {}}
    _seed_job(
        tmp_path, 1, {**base, "clims_miou": 72.0, "pseudo_miou": 80.0, "seg_val_miou": 78.0, "seg_context": context}
    )
    _seed_job(tmp_path, 2, None)  # killed before its demo stage: listed, not averaged
    out = seed_table(tmp_path)
    assert [r["seed"] for r in out["rows"]] == ["0", "1", "2"]
    assert out["mean"]["clims_miou"] == pytest.approx(71.0) and out["sd"]["clims_miou"] == pytest.approx(2**0.5)
    assert out["mean"]["pseudo − CLIMS"] == pytest.approx(6.0)  # (4 + 8) / 2
    assert out["sd"]["pseudo − CLIMS"] == pytest.approx(8**0.5)  # sd of (4, 8)
    assert out["mean"]["DeepLab − pseudo"] == pytest.approx(-3.0)
    assert out["sd"]["baseline_miou"] == 0.0 and math.isnan(out["mean"]["seg_val_crf_miou"])
    # Nested numbers (the demo's DeepLab context row) are read by their dotted key; a seed without them is NaN.
    assert out["rows"][1]["seg_context.without_cobg"] == 40.0 and math.isnan(out["rows"][0]["seg_context.with_cobg"])
    md = (tmp_path / "seeds.md").read_text()
    assert "over 2 seeds" in md and "| 2 (demo not finished) |" in md and "| **mean** | 30.0 | 71.0 | 77.0 |" in md
    assert list(csv.DictReader((tmp_path / "seeds.csv").open()))[-1]["seed"] == "sd"


def test_seed_reaches_every_seeded_stage_but_the_shared_teacher(tmp_path: Path) -> None:
    cfg = compose_config("reproduce", tmp_path, ["experiment=toy_demo_seeds", "seed=2", f"run_dir={tmp_path}"])
    stages = {s.name: s for s in stages_from_config(cfg.pipeline, seed=cfg.seed)}
    seeded = {name for name, s in stages.items() if "seed=2" in s.overrides}
    assert {"cam", "clims", "irn", "seg", "ir_labels", "pseudo", "seg_eval", "demo"} <= seeded
    assert "toyclip" not in seeded and "cams_cam" not in seeded  # shared teacher; infer has no seed
    assert compose_stage(stages["clims"], tmp_path / "clims", tmp_path, []).seed == 2
    assert all("seed=" not in o for s in stages_from_config(cfg.pipeline) for o in s.overrides)  # seed=null
