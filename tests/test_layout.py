"""The house rules of src/: stages on top, one registry, library modules that never import upwards, no cycles."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
from conftest import compose_config

import clims_pl
from clims_pl import cli
from clims_pl.config import CONF_DIR
from clims_pl.pipeline import compose_stage, stages_from_config
from clims_pl.stages import REGISTRY, stage_spec

SRC = Path(clims_pl.__file__).parent
#: Modules that orchestrate stages (they may import the registry and each other); everything else is library.
TOP = ("clims_pl.stages", "clims_pl.cli", "clims_pl.pipeline", "clims_pl.preflight", "clims_pl.ablation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_top(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOP)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (annotations only: not an import at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """clims_pl modules ``name`` imports at run time (module level or inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clims_pl"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clims_pl"):
            for alias in node.names:  # `from clims_pl.stages import seg_eval` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found & set(MODULES)


def test_every_module_imports() -> None:
    for name in MODULES:
        importlib.import_module(name)


def test_library_modules_never_import_stages_or_orchestration() -> None:
    upward = {name: sorted(i for i in imports_of(name) if _is_top(i)) for name in MODULES if not _is_top(name)}
    assert {k: v for k, v in upward.items() if v} == {}


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name) - {name} for name in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path[path.index(nxt) :], nxt])}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_stage_modules_have_a_run_entry() -> None:
    with_run = {
        name
        for name, path in MODULES.items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in ast.parse(path.read_text()).body)
    }
    assert {n for n in with_run if not n.startswith("clims_pl.stages.")} == {"clims_pl.pipeline"}


def test_registry_entries_resolve() -> None:
    for name, spec in REGISTRY.items():
        assert (CONF_DIR / f"{spec.config}.yaml").is_file(), name
        assert callable(spec.entry()), name
        assert spec.description and "\n" not in spec.description, name
    with pytest.raises(ValueError, match=r"pipeline.stages.x.run: no stage named 'camz'.*one of train, cams"):
        stage_spec("camz", "pipeline.stages.x.run")


@pytest.mark.parametrize(
    ("func", "argv", "expected", "absent"),
    [
        (
            cli.train_main,
            ["clims-train", "--help"],
            ["clims-train: train a model", "conf/train.yaml", "  model: cam, clims, irn, seg", "toy_cam"],
            ["hydra:", "--from", "toy_demo", "== Config =="],
        ),
        (
            cli.infer_main,
            ["clims-infer", "-h"],
            ["clims-infer: multi-scale CAMs", "conf/infer.yaml", "  data: "],
            ["--only", "toy_demo"],
        ),
        (
            cli.reproduce_main,
            ["clims-reproduce", "--help"],
            [
                "clims-reproduce: run an experiment's stages",
                "--from STAGE",
                "--only A,B",
                "preflight=true",
                "paper_voc",
            ],
            ["toy_cam", "  model:"],
        ),
        (cli.demo_main, ["clims-demo", "--help"], ["clims-demo: ", "(preset: experiment=toy_demo)", "--from"], []),
    ],
)
def test_help_names_the_command_its_groups_and_flags(
    func, argv: list[str], expected: list[str], absent: list[str], monkeypatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    assert func() is None  # answered before Hydra: nothing composed, no run folder
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text
    for text in absent:
        assert text not in out, text


def test_experiment_stages_name_registry_entries(tmp_path: Path) -> None:
    """Every stage of every pipeline experiment resolves through the registry, as composed (with its defaults)."""
    experiments = [p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
    pipelines = [e for e in experiments if cli._is_pipeline_experiment(e)]
    assert {"paper_voc", "toy_demo", "toy_ablation", "ablation_losses", "ablation_weights"} <= set(pipelines)
    for experiment in pipelines:
        cfg = compose_config("reproduce", tmp_path, [f"experiment={experiment}", f"run_dir={tmp_path}"])
        stages = stages_from_config(cfg.pipeline)
        assert stages, experiment
        for stage in stages:
            assert (stage.config, stage.target) == (lambda s: (s.config, s.target))(
                stage_spec(str(cfg.pipeline.stages[stage.name].get("run") or stage.name))
            )


def test_every_pipeline_hands_its_data_root_to_every_stage_that_reads_data(tmp_path: Path) -> None:
    """``clims-reproduce experiment=<any> data.root=DIR`` reaches every stage with a dataset folder; none keeps its
    data config's default (experiment=toy_demo once ignored data.root)."""
    pipelines = [
        p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml")) if cli._is_pipeline_experiment(p.stem)
    ]
    for experiment in pipelines:
        cfg = compose_config("reproduce", tmp_path, [f"experiment={experiment}", f"run_dir={tmp_path}", "data.root=/x"])
        for stage in stages_from_config(cfg.pipeline):
            composed = compose_stage(stage, tmp_path / stage.name, tmp_path, [])
            if "data" in composed and "root" in composed.data:
                assert composed.data.root == "/x", (experiment, stage.name)
