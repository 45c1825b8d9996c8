"""Magnitude pruning: remove the smallest |W|. Needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import SparsityPattern, select_mask
from .base import LinearStatistics, MethodOptions, PaperReference, PruningMethod, register_method


@dataclass
class MagnitudeOptions(MethodOptions):
    per_row: bool = field(
        default=False,
        metadata={"help": "Rank weights inside each output row instead of the whole matrix (the default, as the "
                          "reference implementations do)."},
    )


@register_method
class MagnitudePruning(PruningMethod):
    """Zero the weights of smallest absolute value (one threshold per matrix by default)."""

    name = "magnitude"
    display_name = "Magnitude"
    paper = PaperReference("Learning both Weights and Connections for Efficient Neural Networks",
                           "Han, Pool, Tran and Dally", 2015, "https://arxiv.org/abs/1506.02626")
    needs_calibration = False
    supports_patterns = ("unstructured", "n:m")
    options_class = MagnitudeOptions

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        mask = select_mask(weight.abs(), pattern, sparsity, per_row=self.options.per_row)
        return weight, mask
