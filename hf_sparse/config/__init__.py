"""Configuration: :class:`SparsityConfig` (what to prune and how) and the one validator every option dataclass uses.

``from hf_sparse.config import SparsityConfig, QUANT_METHOD`` works as before. The names are resolved on first use
(PEP 562) because :mod:`.validation` is imported by the very modules ``SparsityConfig`` builds on (the method options,
the calibration descriptors): importing ``sparsity`` eagerly here would make those imports circular.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"SparsityConfig", "QUANT_METHOD"}

__all__ = ["QUANT_METHOD", "SparsityConfig"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import sparsity

        return getattr(sparsity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
