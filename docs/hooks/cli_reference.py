"""mkdocs hook: pages generated from the code at build time, so they cannot drift from it.

- ``<!-- cli-reference -->`` in a page becomes the reference of every ``hf-sparse`` subcommand, rendered from the
  argparse parser ``hf_sparse.cli.build_parser()`` (whatever subcommands it has: usage, description, and a table of
  options per argument group).
- ``<!-- methods-reference -->`` becomes one section per registered pruning method (``hf_sparse.METHODS``): display
  name, paper, patterns, calibration needs, and its options from the options dataclass (type, default, help).
- ``<!-- fields: dotted.name -->`` becomes a table of the fields of that dataclass (type, default, help from the
  field metadata), e.g. ``<!-- fields: hf_sparse.SparsityConfig -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI_MARKER = "<!-- cli-reference -->"
METHODS_MARKER = "<!-- methods-reference -->"
FIELDS_MARKER = re.compile(r"<!-- fields: (?P<name>[\w.]+) -->")


def _cell(text: object) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    """``text`` as inline code in a table cell (a pipe ends a cell even inside a code span: then HTML is written)."""
    text = str(text).replace("\n", " ")
    if "|" in text or "`" in text:
        return f"<code>{html.escape(text).replace('|', '&#124;').replace('`', '&#96;')}</code>"
    return f"`{text}`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices and not action.metavar:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return f"{names} {_code(metavar)}"


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    return _code(action.default)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "hf-sparse", "default": action.default}
    if action.required and action.option_strings:
        text = f"**required.** {text}"
    return text


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # noqa: SLF001 (argparse has no public walk)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {choice.dest: choice.help for choice in action._choices_actions}  # noqa: SLF001
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def render_cli(parser: argparse.ArgumentParser) -> str:
    """Markdown for ``parser`` and each of its subcommands."""
    out = ["## `hf-sparse`", "", parser.description or "", "", "```text", parser.format_usage().strip(), "```", ""]
    for name, (summary, sub) in _subcommands(parser).items():
        out += [f"## `hf-sparse {name}`", "", f"*{_cell(summary)}*", "", _cell(sub.description or ""), "",
                "```text", sub.format_usage().strip(), "```", ""]
        for group in sub._action_groups:  # noqa: SLF001
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]  # noqa: SLF001
            if not actions:
                continue
            out += [f"**{group.title}**", "", "| argument | default | meaning |", "|---|---|---|"]
            out += [f"| {_flags(a)} | {_default(a)} | {_cell(_help(a))} |" for a in actions]
            out.append("")
    return "\n".join(out)


def _default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def render_fields(cls: type) -> str:
    """A table of the init fields of dataclass ``cls``: name, type, default, help."""
    out = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        try:
            default = json.dumps(_default_of(f))
        except TypeError:
            default = repr(_default_of(f))
        out.append(f"| `{f.name}` | {_code(_type_name(f))} | {_code(default)} | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(out) + "\n"


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def render_methods() -> str:
    """Markdown for every registered method, from its class and options dataclass."""
    from hf_sparse import METHODS

    out = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        patterns = ", ".join("N:M" if p == "n:m" else p for p in cls.supports_patterns)
        out += [f"## `{name}`: {cls.display_name}", "", _cell(summary), ""]
        if cls.paper:
            out += [f"Paper: [{_cell(cls.paper.citation)}]({cls.paper.url})", ""]
        out += [f"Patterns: {patterns}. Calibration: {'needed' if cls.needs_calibration else 'not needed'}."
                + (" Blocks can be pruned in parallel (`parallel=True`)." if cls.propagate_dense else ""), ""]
        if not dataclasses.fields(cls.options_class):
            out += ["No options.", ""]
            continue
        out.append(render_fields(cls.options_class))
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs hook signature)
    if CLI_MARKER not in markdown and METHODS_MARKER not in markdown and not FIELDS_MARKER.search(markdown):
        return markdown
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if CLI_MARKER in markdown:
        from hf_sparse.cli import build_parser

        markdown = markdown.replace(CLI_MARKER, render_cli(build_parser()))
    if METHODS_MARKER in markdown:
        markdown = markdown.replace(METHODS_MARKER, render_methods())
    return FIELDS_MARKER.sub(lambda match: render_fields(_resolve(match["name"])), markdown)
