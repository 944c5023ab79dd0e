"""Stage pipeline: skip when current, rerun on deleted artifacts / changed config / --from / --only, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from omegaconf import DictConfig

from clims_pl.pipeline import Stage, run_pipeline

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
    upstream = out.parent / "a" / "out.txt"
    (out / "out.txt").write_text(f"{cfg.seed}|{upstream.read_text() if name != 'a' else ''}")
    return {"value": float(cfg.seed)}


def _stages(seed_b: int = 1) -> list[Stage]:
    def st(name: str, after: tuple[str, ...], seed: int) -> Stage:
        return Stage(name, "reproduce", "test_pipeline:fake_stage", after, (f"seed={seed}",), ("out.txt",))

    return [st("a", (), 0), st("b", ("a",), seed_b), st("c", ("b",), 2)]


@pytest.fixture(autouse=True)
def _reset() -> None:
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


def test_killed_stage_runs_again_and_later_stages_follow(tmp_path: Path) -> None:
    FAIL_ONCE.add("b")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert not (tmp_path / "run" / "b" / "manifest.json").exists()
    run_pipeline(_stages(), tmp_path / "run", tmp_path)
    assert CALLS == {"a": 1, "b": 2, "c": 1}


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
