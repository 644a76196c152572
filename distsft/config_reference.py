"""Configuration: the reference table of every config key (default and one-line doc), generated from the schema in
distsft/config.py into docs/config.md (``python -m distsft.config_reference --docs``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .config import ASSETS, Config


def reference() -> str:
    """Markdown table of every config key, its default and its docstring (docs/config.md embeds it)."""
    import dataclasses
    import inspect

    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        src = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            idx = next(i for i, line in enumerate(src) if line.strip().startswith(f"{f.name}:"))
            doc = src[idx - 1].strip().removeprefix("#:").strip()
            if isinstance(default, str) and default.startswith(str(ASSETS)):
                default = "(embedded asset)"
            elif isinstance(default, list):
                default = ["(embedded asset)" if str(x).startswith(str(ASSETS)) else x for x in default]
            lines.append(f"| `{prefix}{f.name}` | `{default}` | {doc.replace('|', '/')} |")

    walk(Config, "")
    return "\n".join(lines)


def main() -> None:
    """--docs: refresh the table between docs/config.md's markers; else print it."""
    if sys.argv[1:] in (["--docs"], ["--readme"]):  # refresh the table between docs/config.md's markers
        page = Path(__file__).resolve().parent.parent / "docs" / "config.md"
        text = re.sub(r"(<!-- config-reference:[^\n]*-->\n).*?(\n<!-- /config-reference -->)",
                      lambda m: m.group(1) + reference() + m.group(2), page.read_text(), flags=re.S)
        page.write_text(text)
    else:
        print(reference())


if __name__ == "__main__":
    main()
