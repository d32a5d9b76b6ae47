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


# ---- docs/commands.md's flag tables are generated from the parsers, so they cannot drift from --help ----

FLAGS_START, FLAGS_END = "<!-- flags:start (generated: SCARLET_UPDATE_DOCS=1 pytest tests/test_docs.py) -->", "<!-- flags:end -->"


def flag_tables() -> str:
    """A markdown table per `scarlet` sub-command, read from its argparse parser."""
    import argparse

    from scarlet_deploy.runtime.cli import build_parser

    def cell(s) -> str:
        return " ".join(str(s).split()).replace("|", "\\|")

    import os

    saved = os.environ.pop("SCARLET_CACHE_DIR", None)  # verify's default reads it; the test session sets it
    try:
        parser = build_parser()
    finally:
        if saved is not None:
            os.environ["SCARLET_CACHE_DIR"] = saved
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {ca.dest: ca.help for ca in sub._choices_actions}
    out = []
    for name, sp in sub.choices.items():
        out.append(f"### `scarlet {name}`\n")
        if helps.get(name):
            out.append(cell(helps[name]).rstrip(".") + ".\n")
        out.append("| flag | default | what it does |\n|---|---|---|")
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if a.option_strings:
                flag = ", ".join(a.option_strings)
                if a.nargs != 0:
                    mv = a.metavar or (("{" + ",".join(map(str, a.choices)) + "}") if a.choices else a.dest.upper())
                    flag += f" {' '.join(mv) if isinstance(mv, tuple) else mv}" + (" ..." if a.nargs in ("+", "*") else "")
            else:
                flag = (a.metavar or a.dest) + (" ..." if a.nargs in ("+", "*") else "")
            d = a.default
            shown = "" if a.nargs == 0 or d in (None, False, [], ()) or d is argparse.SUPPRESS else \
                f"`{cell(' '.join(map(str, d)) if isinstance(d, (list, tuple)) else d)}`"
            req = " (required)" if getattr(a, "required", False) and a.option_strings else ""
            out.append(f"| `{cell(flag)}`{req} | {shown} | {cell(a.help or '')} |")
        out.append("")
    return "\n".join(out)


def test_commands_md_flag_tables_match_the_parsers():
    import os

    path = ROOT / "docs" / "commands.md"
    text = path.read_text()
    assert FLAGS_START in text and FLAGS_END in text, f"{path} lost its generated-flags markers"
    head, rest = text.split(FLAGS_START, 1)
    _, tail = rest.split(FLAGS_END, 1)
    want = f"{FLAGS_START}\n\n{flag_tables()}\n{FLAGS_END}"
    if os.environ.get("SCARLET_UPDATE_DOCS"):
        path.write_text(head + want + tail)
    assert head + want + tail == path.read_text(), \
        "docs/commands.md's flag tables differ from the parsers: run SCARLET_UPDATE_DOCS=1 pytest tests/test_docs.py"
