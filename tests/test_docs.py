"""The README is a front door to docs/: its links must land, and the files commands rewrite must be where
the Makefile and CI say they are."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from scarlet_deploy.runtime.bench import readme as breadme

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped except hyphens, spaces become hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), flags=re.M)}


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # shell examples are not links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _relative_links(ROOT / "README.md")}
    linked |= {(ROOT / "docs" / t.partition("#")[0]).resolve() for t in _relative_links(ROOT / "docs" / "README.md")}
    orphans = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages no index links to: {orphans}"


def test_bench_rewrites_the_file_the_makefile_names():
    # `make bench BENCH_ARGS="--readme FILE"`: FILE must hold the markers exactly once, in order, or bench
    # refuses to write its table at the end of a long run.
    named = re.findall(r'--readme (\S+?)"', (ROOT / "Makefile").read_text())
    assert named == ["docs/performance.md"]
    text = (ROOT / named[0]).read_text()
    assert text.count(breadme.README_BEGIN) == 1 and text.count(breadme.README_END) == 1
    assert text.index(breadme.README_BEGIN) < text.index(breadme.README_END)
    assert breadme.README_BEGIN not in (ROOT / "README.md").read_text()


def test_ci_runs_the_test_command_the_readme_gives():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make test" in quick_start and "make deploy" in quick_start
