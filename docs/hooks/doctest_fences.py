"""griffe extension for the API reference: docstrings written for Python's help() render well as Markdown.

The docstrings are plain text with doctests, which the test suite runs (``--doctest-modules``), and Sphinx-style
cross-references (``:func:`prune` ``). Read as Markdown, a doctest line is a paragraph (``record["calibration"]["kind"]``
even looks like a reference link) and a role is literal text. In the rendered copy only, this wraps every doctest run
(from a ``>>>`` line to the next blank line) in a ``pycon`` fence and turns each role into inline code.
"""

from __future__ import annotations

import re

import griffe

PROMPT = re.compile(r"^(?P<indent>\s*)>>> ")
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`~?(?P<target>[^`]+)`")


def plain_roles(text: str) -> str:
    """``:func:`hf_sparse.prune` `` -> `` `hf_sparse.prune` ``; ``~a.b`` keeps ``a.b``; outside doctests only."""
    return ROLE.sub(lambda match: f"`{match['target']}`", text)


def fence_doctests(text: str) -> str:
    """``text`` with each doctest run wrapped in a fenced ``pycon`` block at its own indentation, roles as code."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        prompt = PROMPT.match(lines[i])
        if not prompt:
            out.append(plain_roles(lines[i]))
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
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
