"""A wheel (``pip install .`` without ``-e``) ships ``conf/`` and the prompt banks, and its commands compose from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Runs in the installed copy only: the console scripts as the wheel declares them, on that copy's configs.
SCRIPT = """
import importlib.metadata as md, sys
from hydra.core.global_hydra import GlobalHydra
import clims_pl
from clims_pl.config import CONF_DIR
print("MODULE", clims_pl.__file__)
print("CONF_DIR", CONF_DIR)
for name, args in [
    ("clims-train", ["experiment=toy_cam"]),
    ("clims-reproduce", ["experiment=paper_voc", "data.root=/data/VOC2012"]),
]:
    (script,) = md.entry_points(group="console_scripts", name=name)
    sys.argv = [name, *args, "--cfg", "job"]
    print("COMMAND", name, flush=True)
    script.load()()
    GlobalHydra.instance().clear()
"""


@pytest.mark.slow
def test_wheel_ships_configs_and_its_commands_find_them(tmp_path: Path) -> None:
    source = tmp_path / "src_copy"  # a copy, so that the build leaves no build/ or egg-info in the checkout
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / part, source / part)
    for part in ("src", "conf"):
        shutil.copytree(REPO / part, source / part, symlinks=True, ignore=skip)
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(dist)], check=True)
    (wheel,) = dist.glob("clims_pl-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"clims_pl/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert {"clims_pl/conf/train.yaml", "clims_pl/conf/experiment/paper_voc.yaml"} <= configs
    assert configs <= names, sorted(configs - names)
    prompts = {f"clims_pl/prompts/{p.name}" for p in (REPO / "src/clims_pl/prompts").glob("*.yaml")}
    assert prompts and prompts <= names

    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIMS_CONF_DIR", "CLIMS_ROOT")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**env, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert f"MODULE {site / 'clims_pl' / '__init__.py'}" in text  # not the checkout's src/
    assert f"CONF_DIR {site / 'clims_pl' / 'conf'}" in text
    train, reproduce = text.split("COMMAND clims-reproduce")
    assert "backbone: resnet18_toy" in train  # experiment=toy_cam's trunk, from conf/trunk/toy.yaml
    assert "data:\n  root: /data/VOC2012" in reproduce
    assert "task_name: paper_voc" in reproduce  # conf/experiment/paper_voc.yaml was found and merged
    assert not (tmp_path / "runs").exists()  # --cfg job composes only
