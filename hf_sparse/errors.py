"""How error messages show a user's value: cut to a readable length, so a hostile or huge input never prints megabytes.

Every layer may use this module; it imports nothing of hf_sparse.
"""

from __future__ import annotations

from typing import Any

#: the longest ``repr`` an error message echoes before cutting it
SHOWN_LENGTH = 80
#: the limit for a file or folder path, which a user needs whole to find the file (still bounded)
PATH_SHOWN = 300


def shown(value: Any, limit: int = SHOWN_LENGTH) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the total length said when it was cut.

    >>> shown("2:4")
    "'2:4'"
    >>> shown("x" * 1000, limit=12)
    "'xxxxxxxxx… (1002 characters)"
    """
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not replace the error being reported
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:max(limit - 2, 1)]}… ({len(text)} characters)"


__all__ = ["PATH_SHOWN", "SHOWN_LENGTH", "shown"]
