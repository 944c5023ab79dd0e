"""The project documents itself: code and docs cite docs/reference.md by anchors that exist, never a file outside
the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What users get: everything a citation may live in.
SCANNED = ("src", "conf", "tests", "docs", "benchmarks", "README.md", "Makefile")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg"}
#: Written escaped so that this file does not trip its own check.
FORBIDDEN = ("../" + "shared", "CLIMS_" + "REFERENCE", "\u00a7")
#: ``<file>.md#<anchor>``: a markdown link target or a plain citation such as docs/reference.md#polyoptimizer.
MD_CITATION = re.compile(r"([\w./-]*\.md)#([\w-]+)")
#: A quirk id outside a link or anchor (code cites a quirk by its heading anchor in docs/reference.md).
BARE_QUIRK = re.compile(r"(?<![\w\[#/-])Q\d+(?![\w\]])")


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them: lower case, punctuation dropped, spaces to '-', '-N' for repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        repeat = seen.get(slug, 0)
        seen[slug] = repeat + 1
        anchors.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return anchors


def text_files() -> list[Path]:
    found: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            found.append(top)
        elif top.is_dir():
            found += [p for p in top.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    return sorted(p for p in found if "__pycache__" not in p.parts)


def resolve_md(source: Path, target: str) -> Path | None:
    """The markdown file a citation names: relative to the citing file (links) or to the repository root."""
    for base in (source.parent, ROOT):
        path = (base / target).resolve()
        if path.is_file():
            return path
    return None


def test_github_anchor_rules():
    text = "# Stage A: baseline CAM\n## Q4 REG over all classes\n### ResNet-50 with `FixedBN`\n## Data\n## Data\n"
    text += "```\n# not a heading\n```\n"
    assert github_anchors(text) == {
        "stage-a-baseline-cam",
        "q4-reg-over-all-classes",
        "resnet-50-with-fixedbn",
        "data",
        "data-1",
    }


def test_nothing_cites_files_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {bad!r}"
        for path in text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for bad in FORBIDDEN
        if bad in line
    ]
    assert not offenders, "cite docs/reference.md#<anchor> instead:\n" + "\n".join(offenders)


def test_every_cited_markdown_anchor_exists():
    anchors: dict[Path, set[str]] = {}
    checked, broken = 0, []
    for path in text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target, anchor in MD_CITATION.findall(line):
                doc = resolve_md(path, target)
                if doc is None:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target} does not exist")
                    continue
                if doc not in anchors:
                    anchors[doc] = github_anchors(doc.read_text(encoding="utf-8"))
                checked += 1
                if anchor not in anchors[doc]:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: no heading for #{anchor} in {target}")
    assert not broken, "\n".join(broken)
    assert checked > 200  # the code's ~250 citations were found, so the scan really ran over them


def test_reference_page_has_every_quirk_and_stage():
    anchors = github_anchors((ROOT / "docs/reference.md").read_text(encoding="utf-8"))
    quirks = {a.split("-")[0] for a in anchors if re.fullmatch(r"q\d+-.+", a)}
    assert quirks == {f"q{n}" for n in range(1, 29)}
    stages = {a for a in anchors if a.startswith("stage-")}
    assert {s.split("-")[1] for s in stages} == set("abcdefghi")


@pytest.mark.parametrize("top", ["src", "conf", "tests", "benchmarks"])
def test_code_cites_quirks_by_anchor(top: str):
    """A bare quirk id in code names nothing a reader can open; its heading anchor in docs/reference.md does."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in text_files()
        if path.is_relative_to(ROOT / top) and path.suffix != ".md" and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if BARE_QUIRK.search(line)
    ]
    assert not offenders, "\n".join(offenders)
