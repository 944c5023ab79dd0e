"""What users type: the dataset folder is ``data.root`` on every command and in make, the config folder is found
from the package, and every environment variable the project reads is documented in the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from clims_pl import config
from clims_pl.pipeline import compose_stage, stages_from_config

REPO = Path(__file__).resolve().parents[1]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    """``make -n`` (print, run nothing) in the repository, with a placeholder venv."""
    return subprocess.run(["make", "-n", "-C", str(REPO), "BIN=bin", "STAMP=", *args], capture_output=True, text=True)


def test_make_passes_data_root_as_typed() -> None:
    printed = _make("reproduce", "data.root=/data/VOC2012").stdout
    assert "bin/clims-reproduce experiment=paper_voc data.root=/data/VOC2012" in printed
    # Unset: no data.root at all, so conf/reproduce.yaml's default is the only one.
    assert "data.root" not in next(line for line in _make("preflight").stdout.splitlines() if "clims-reproduce" in line)


def test_make_names_the_new_spelling_for_voc_root() -> None:
    out = _make("reproduce", "VOC_ROOT=/data/VOC2012")
    assert out.returncode != 0
    assert "VOC_ROOT is now data.root, as on every command: make reproduce data.root=/data/VOC2012" in out.stderr


@pytest.mark.parametrize("arg", ["data_root=/data/VOC2012", "+data_root=/data/VOC2012"])
def test_reproduce_names_the_new_spelling_for_data_root(arg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from clims_pl.cli import reproduce_main

    monkeypatch.setattr(sys, "argv", ["clims-reproduce", "experiment=paper_voc", arg])
    with pytest.raises(
        SystemExit, match=r"the dataset folder is data\.root, as on every command: data\.root=/data/VOC"
    ):
        reproduce_main()


def test_pipeline_and_stage_default_to_the_same_data_root(tmp_path: Path) -> None:
    """Without data.root, clims-reproduce hands every stage the folder clims-train would read on its own."""
    cfg = compose_config("reproduce", tmp_path, ["experiment=paper_voc"])
    alone = compose_config("train", tmp_path, ["experiment=paper_voc_cam"])
    assert cfg.data.root == alone.data.root == f"{tmp_path}/data/VOCdevkit/VOC2012"
    (cam,) = [s for s in stages_from_config(cfg.pipeline) if s.name == "cam"]
    assert compose_stage(cam, tmp_path / "cam", tmp_path, []).data.root == cfg.data.root


def test_no_old_data_root_spelling_in_docs_and_configs() -> None:
    old = re.compile(r"\b(?:VOC_ROOT|data_root|CLIMS_VOC_ROOT)\s*[?:]?=|\$\{data_root\}")
    files = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").glob("*.md"), *(REPO / "conf").rglob("*.yaml")]
    files += [*(REPO / "notebooks").glob("*.ipynb")]
    hits = [f"{f.relative_to(REPO)}: {m.group(0)}" for f in files for m in old.finditer(f.read_text())]
    assert len(files) > 40 and not hits


def test_conf_dir_is_the_packaged_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLIMS_CONF_DIR", raising=False)
    packaged = config._conf_dir()
    assert packaged == Path(config.__file__).resolve().parent / "conf"
    assert packaged.resolve() == REPO / "conf"  # the checkout's link to the top-level conf/
    monkeypatch.setenv("CLIMS_CONF_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"CLIMS_CONF_DIR={tmp_path}: no train.yaml there"):
        config._conf_dir()
    (tmp_path / "train.yaml").write_text("a: 1\n")
    assert config._conf_dir() == tmp_path


#: How code reads an environment variable: Python (src/, notebooks), OmegaConf (conf/), shell recipes (Makefile).
_READS = re.compile(r"""(?:environ(?:\.get)?[(\[]|getenv\()\\?["'](\w+)|\$\{oc\.env:(\w+)|\$\$\{?([A-Z][A-Z0-9_]+)""")


def test_every_environment_variable_read_is_documented() -> None:
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), *(REPO / "notebooks").glob("*.ipynb")]
    read = {name for f in [*sources, REPO / "Makefile"] for m in _READS.finditer(f.read_text()) for name in m.groups()}
    read.discard(None)
    assert {"CLIMS_ROOT", "CLIMS_CONF_DIR", "CLIMS_RUN_DIR", "CLIMS_DATA_ROOT"} <= read  # the scan finds all kinds
    readme = REPO.joinpath("README.md").read_text()
    table = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert read <= documented, f"read but not in README's Environment variables table: {sorted(read - documented)}"
