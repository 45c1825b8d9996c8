"""``hf-sparse methods``: every registered method, read from its class (metadata and options dataclass)."""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = "list the registered pruning methods and their options"
DESCRIPTION = "List every registered pruning method: paper, patterns, calibration needs and options with their help."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


def describe_methods() -> str:
    """Every registered method with its patterns, calibration needs and options (from the options dataclass help).

    >>> "sparsegpt" in describe_methods()
    True
    """
    from ..methods import METHODS

    lines = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        needs = "needs calibration" if cls.needs_calibration else "no calibration"
        patterns = ", ".join("N:M" if p == "n:m" else p for p in cls.supports_patterns)
        lines.append(f"{name}: {summary}")
        lines.append(f"  {cls.display_name}" + (f", from {cls.paper.citation} <{cls.paper.url}>" if cls.paper else ""))
        lines.append(f"  patterns: {patterns}; {needs}" + ("; --parallel supported" if cls.propagate_dense else ""))
        fields = dataclasses.fields(cls.options_class)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            help_text = f.metadata.get("help", "")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"  --method-option {f.name}=<{kind}> (default {json.dumps(default)}): {help_text}")
        if not fields:
            lines.append("  (no options)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    print(describe_methods())
