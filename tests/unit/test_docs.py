"""The documentation holds together: README.md is a front door of at most 200 lines, every relative link in it and
in docs/*.md points at a file that exists (and, for `#anchor` links into a markdown file, at a heading there, with
GitHub's anchor slugs), and every docs/*.md page is reachable from the README. A negative control proves the
checker finds a broken link, a broken anchor and an orphan page."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

README_MAX_LINES = 200
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link in a markdown file (code blocks and code spans left out)."""
    out, fenced = [], False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not SCHEME.match(target):
                out.append((no, target))
    return out


def resolve(source: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return (source.parent / path if path else source).resolve(), anchor


def broken_links(files: list[Path]) -> list[str]:
    """'file:line: target (why)' for every relative link that points nowhere."""
    problems = []
    for source in files:
        for no, target in links(source):
            path, anchor = resolve(source, target)
            where = f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}:{no}: {target}"
            if not path.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where} (no heading with anchor #{anchor} in {path.name})")
    return problems


def unreachable(readme: Path, pages: list[Path]) -> list[Path]:
    """The pages that no chain of links from the README reaches."""
    reached, todo = {readme.resolve()}, [readme.resolve()]
    while todo:
        source = todo.pop()
        for _, target in links(source):
            path, _ = resolve(source, target)
            if path.suffix == ".md" and path.exists() and path not in reached:
                reached.add(path)
                todo.append(path)
    return [p for p in pages if p.resolve() not in reached]


def doc_files(root: Path) -> tuple[Path, list[Path]]:
    return root / "README.md", sorted((root / "docs").glob("*.md"))


def test_readme_is_a_front_door_of_at_most_200_lines():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move the long text into docs/ (at most {README_MAX_LINES})"


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    readme, pages = doc_files(ROOT)
    assert pages, "docs/*.md is empty"
    problems = broken_links([readme, *pages])
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_reachable_from_the_readme():
    readme, pages = doc_files(ROOT)
    orphans = unreachable(readme, pages)
    names = ", ".join(str(p.relative_to(ROOT)) for p in orphans)
    assert not orphans, f"docs pages that no chain of links from README.md reaches: {names}"


def test_the_quick_start_commands_are_in_the_readme():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash launch/quickstart.sh" in text and "bash tests/run.sh" in text


def test_slugs_follow_github():
    heading = "Long sequences: sequence parallelism (`parallel.sp_size`)"
    assert slug(heading) == "long-sequences-sequence-parallelism-parallelsp_size"
    assert slug("What a run writes") == "what-a-run-writes"
    assert slug("LoRA, QLoRA and optimizers") == "lora-qlora-and-optimizers"
    assert slug("See [the plan](docs/plan.md) first") == "see-the-plan-first"


def test_the_checker_finds_a_broken_link_a_broken_anchor_and_an_orphan(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Front\n\n[ok](docs/a.md#part-two) [gone](docs/missing.md) "
                                        "[bad anchor](docs/a.md#nowhere) [self](#front) `[code](docs/x.md)`\n\n"
                                        "```\n[fenced](docs/fenced.md)\n```\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Part two\n\n[back](../README.md#front) [web](https://x.org/y)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n\n[home](../README.md)\n")
    readme, pages = doc_files(tmp_path)
    problems = broken_links([readme, *pages])
    assert len(problems) == 2, problems
    assert "docs/missing.md (no such file)" in problems[0]
    assert "docs/a.md#nowhere (no heading with anchor #nowhere in a.md)" in problems[1]
    assert unreachable(readme, pages) == [tmp_path / "docs" / "orphan.md"]
