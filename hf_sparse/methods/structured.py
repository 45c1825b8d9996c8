"""Base class of structured methods: they decide block edits (heads, channels, whole blocks), not weight masks.

A structured method implements :meth:`StructuredPruningMethod.plan_edits`, reading what it needs from the
:class:`~hf_sparse.engine.structured.StructuredSession` and returning :class:`~hf_sparse.surgery.StructuredEdits`;
the engine's ``structured`` pipeline applies them through :mod:`hf_sparse.surgery` (methods never touch modules).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from ..masks import SparsityPattern
from .base import LinearStatistics, PruningMethod

if TYPE_CHECKING:  # the pipeline imports the engine, which imports this package: annotations only
    from ..engine.structured import StructuredSession
    from ..surgery import StructuredEdits


def blocks_for_fraction(num_blocks: int, sparsity: float) -> int:
    """How many whole blocks to remove so the removed share is closest to ``sparsity`` (blocks have equal size).
    Raises when that is none or all of them.

    >>> blocks_for_fraction(30, 0.3)
    9
    """
    count = int(sparsity * num_blocks + 0.5)
    if count < 1:
        raise ValueError(f"sparsity {sparsity} is closer to removing no block than one of {num_blocks}: layer removal "
                         f"removes multiples of {1 / num_blocks:.4f} of the block parameters")
    if count >= num_blocks:
        raise ValueError(f"sparsity {sparsity} would remove all {num_blocks} decoder blocks")
    return count


class StructuredPruningMethod(PruningMethod):
    """A method for ``pattern="structured"``: ``sparsity`` is the fraction of decoder-block parameters to remove."""

    # Calibration is measured through the StructuredSession (whole blocks, input moments, losses), not per linear.
    needs_calibration: ClassVar[bool] = True
    supports_patterns: ClassVar[tuple[str, ...]] = ("structured",)
    edits_structure: ClassVar[bool] = True
    #: structures the method removes (names from hf_sparse.architectures.STRUCTURES), checked before any weight loads
    removes: ClassVar[tuple[str, ...]] = ()

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{self.name!r} is a structured method: it edits whole blocks through plan_edits, it does not "
                        "mask single weight matrices")

    @abstractmethod
    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        """Decide which heads, channels or blocks go so that ``sparsity`` of the block parameters is removed."""


def check_structures(model, method_name: str) -> None:
    """Raise before the weights load if ``model``'s architecture cannot have ``method_name``'s structures removed."""
    from ..architectures import get_architecture
    from .base import get_method_class

    adapter = get_architecture(model)
    for structure in getattr(get_method_class(method_name), "removes", ()):
        adapter.structure(structure, getattr(model.config, "model_type", None))
