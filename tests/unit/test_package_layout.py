"""The tests mirror the package: every module of distsft/ has its own tests/unit/test_<module>.py (or
tests/integration/test_<module>.py), or a line in tests/README.md saying where it is covered."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_has_its_test_file_or_a_line_in_tests_readme():
    readme = (ROOT / "tests" / "README.md").read_text()
    missing = []
    for path in sorted((ROOT / "distsft").rglob("*.py")):
        if path.name == "__init__.py" or "assets" in path.parts:
            continue
        own = any((ROOT / "tests" / d / f"test_{path.stem}.py").exists() for d in ("unit", "integration"))
        if not own and f"`{path.relative_to(ROOT)}`" not in readme:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"no test file and no line in tests/README.md: {missing}"


def test_the_lines_of_tests_readme_name_test_files_that_exist():
    for line in (ROOT / "tests" / "README.md").read_text().splitlines():
        if line.startswith("| `distsft/"):
            for name in line.split("|")[2].replace("`", "").split(","):
                name = name.strip().split(" ")[0].strip("()")
                if name.endswith(".py"):
                    assert (ROOT / "tests" / name).exists(), line
