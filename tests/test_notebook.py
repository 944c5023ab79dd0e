"""notebooks/cam_gallery.ipynb runs top to bottom on a tiny synthetic run, in this venv's kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from cam_fixtures import write_cam_files, write_voc_root
from nbclient import NotebookClient

from clims_pl.stages.evaluate import run as run_eval

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cam_gallery.ipynb"


@pytest.mark.slow
def test_cam_gallery_executes(tmp_path: Path, compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"2007_000001": (30, 45), "2007_000002": (36, 24), "2007_000003": (20, 20)}
    write_cam_files(tmp_path / "run" / "cams", write_voc_root(tmp_path / "voc", shapes))
    run_eval(compose_cfg("eval", [f"data.root={tmp_path / 'voc'}", f"run_dir={tmp_path / 'run'}"]))
    monkeypatch.setenv("CLIMS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("CLIMS_GALLERY_N", "2")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert f"(prefix {sys.prefix})" in text  # the kernel is this venv's python, not some other ipykernel
    assert "3 images of split train" in text and "2007_000002" in text
    markdown = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert markdown and "| mIoU @ 0.15 |" in markdown[0]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1 + 2  # the threshold curve + two gallery panels
