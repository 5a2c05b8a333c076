"""The README's own code blocks, so that tests run what a reader copies."""

from __future__ import annotations

import re

from tests.policies import ROOT

README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks(heading: str, language: str) -> list[str]:
    """The `language` code blocks of the README's section under `heading` (a line such as
    "## Client SDKs"), up to the next heading of the same level or above."""
    level = len(heading.split(" ")[0])
    section: list[str] = []
    inside, fenced = False, False
    for line in README.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            marks = len(line) - len(line.lstrip("#"))
            if line.rstrip("\n") == heading:
                inside = True
                continue
            if inside and marks <= level:
                break
        if inside:
            section.append(line)
    return [body for lang, body in _BLOCK.findall("".join(section)) if lang == language]


def commands(block: str) -> list[str]:
    """The shell commands of a bash block: one per line, comments and continuations joined."""
    joined = block.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]
