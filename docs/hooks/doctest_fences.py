"""griffe extension for the API reference: docstring examples (``>>>`` lines with their output) render as code.

The docstrings are plain text with doctests, which the test suite runs (``--doctest-modules``). Read as Markdown,
a doctest line is a paragraph, and ``record["calibration"]["kind"]`` even looks like a reference link. This wraps
every doctest run (from a ``>>>`` line to the next blank line) in a ``pycon`` fence, in the rendered copy only.
"""

from __future__ import annotations

import re

import griffe

PROMPT = re.compile(r"^(?P<indent>\s*)>>> ")


def fence_doctests(text: str) -> str:
    """``text`` with each doctest run wrapped in a fenced ``pycon`` block at its own indentation."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        prompt = PROMPT.match(lines[i])
        if not prompt:
            out.append(lines[i])
            i += 1
            continue
        indent = prompt["indent"]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctests of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002 (griffe hook signature)
        if obj.docstring is not None and ">>> " in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
