"""The fenced code blocks of a Markdown page, with the doc-test marker written above each.

A block is run by the tests as it is written. A marker, an HTML comment on the line right
above the fence (GitHub does not render it), changes how:
``<!-- doc-test: slow -->`` runs it in the slow step only; ``<!-- doc-test: skip (reason) -->``
never runs it, and says why; ``needs NAME.py`` in a marker writes a stand-in NAME.py (the
reference adapter under that name) into the folder the block runs in; ``requires a, b`` skips
the block where one of those Python packages is not installed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str  # "" when the block runs in the default suite

    @property
    def doctest(self) -> bool:
        return self.language == "python" and self.text.lstrip().startswith(">>>")

    @property
    def slow(self) -> bool:
        return self.marker.startswith("slow")

    @property
    def skip_reason(self) -> str | None:
        return self.marker[len("skip"):].strip(" ()") or "marked skip" if self.marker.startswith("skip") else None

    @property
    def needs(self) -> list[str]:
        return re.findall(r"needs (\w+\.py)", self.marker)

    @property
    def requires(self) -> list[str]:
        match = re.search(r"requires ([\w, ]+)", self.marker)
        return [name.strip() for name in match.group(1).split(",")] if match else []

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found = []
    start = None
    for number, line in enumerate(lines):
        match = FENCE.match(line)
        if not match:
            continue
        if start is None:
            start, language = number, match.group(1)
        else:
            above = MARKER.match(lines[start - 1].strip()) if start else None
            found.append(Block(page, start + 1, language, "\n".join(lines[start + 1:number]) + "\n", above.group(1) if above else ""))
            start = None
    return found


def doctest_text(page: Path) -> str:
    """The page with everything outside its ``>>>`` python blocks blanked (line numbers kept, for doctest)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    kept = [""] * len(lines)
    for block in blocks(page):
        if block.doctest:
            for offset, line in enumerate(block.text.split("\n")[:-1]):
                kept[block.line + offset] = line
    return "\n".join(kept)


def prompts_outside_blocks(page: Path) -> list[int]:
    """Line numbers of ``>>>`` prompts outside any fence (they render as nested quotes on GitHub)."""
    inside = False
    lines = []
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), start=1):
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.lstrip().startswith(">>>"):
            lines.append(number)
    return lines
