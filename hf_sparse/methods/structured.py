"""Base class of structured methods: they decide block edits (heads, channels, whole blocks), not weight masks.

A structured method implements :meth:`StructuredPruningMethod.plan_edits`, reading what it needs from the
:class:`~hf_sparse.engine.structured.StructuredSession` and returning :class:`~hf_sparse.surgery.StructuredEdits`;
the engine's ``structured`` pipeline applies them through :mod:`hf_sparse.surgery` (methods never touch modules).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from ..engine.structured import StructuredSession
from ..masks import SparsityPattern
from ..surgery import StructuredEdits
from .base import LinearStatistics, PruningMethod


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
    #: the method can give each block its own share to remove (``session.block_targets``, from a non-uniform sparsity
    #: profile) instead of deciding the blocks' shares itself from one overall budget
    per_block_targets: ClassVar[bool] = False

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{self.name!r} is a structured method: it edits whole blocks through plan_edits, it does not "
                        "mask single weight matrices")

    @classmethod
    def check_block_targets(cls) -> None:
        """Raise unless the method takes per-block targets (:func:`check_per_block_targets`); the engine asks before
        it hands them over."""
        check_per_block_targets(cls)

    @abstractmethod
    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        """Decide which heads, channels or blocks go so that ``sparsity`` of the block parameters is removed.

        When ``session.block_targets`` is set (only for methods declaring ``per_block_targets``), block ``i`` is to
        lose ``session.block_targets[i]`` of its own parameters, and ``sparsity`` is their parameter-weighted mean."""


def check_per_block_targets(method_cls: type[PruningMethod], asked_by: str = "per-block targets") -> None:
    """Raise unless structured method ``method_cls`` can take per-block targets (``asked_by`` says what asks for
    them, for the message: the sparsity profile).

    >>> from hf_sparse.methods import get_method_class
    >>> check_per_block_targets(get_method_class("shortgpt"), "sparsity_profile='owl'")
    Traceback (most recent call last):
    ...
    ValueError: sparsity_profile='owl' gives every decoder block its own share to remove, but method 'shortgpt' removes whole decoder blocks, so no block can lose part of itself; per-block targets work with structured methods ['disp_llm', 'flap', 'pip']; use sparsity_profile='uniform' with 'shortgpt'
    """
    from .base import METHODS

    if getattr(method_cls, "per_block_targets", False):
        return
    accepting = sorted(name for name, cls in METHODS.items() if getattr(cls, "per_block_targets", False))
    reason = ("removes whole decoder blocks, so no block can lose part of itself" if "blocks" in
              getattr(method_cls, "removes", ()) else "decides how much each block loses itself")
    raise ValueError(f"{asked_by} gives every decoder block its own share to remove, but method "
                     f"{method_cls.name!r} {reason}; per-block targets work with structured methods {accepting}; "
                     f"use sparsity_profile='uniform' with {method_cls.name!r}")


def check_structures(model, method_name: str) -> None:
    """Raise before the weights load if ``model``'s architecture cannot have ``method_name``'s structures removed."""
    from ..architectures import get_architecture
    from .base import get_method_class

    adapter = get_architecture(model)
    for structure in getattr(get_method_class(method_name), "removes", ()):
        adapter.structure(structure, getattr(model.config, "model_type", None))
