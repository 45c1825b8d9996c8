"""Wanda (Sun et al., 2023): score each weight by |W_ij| · ‖X_j‖₂ and prune per output row."""

from __future__ import annotations

import torch

from ..masks import SparsityPattern, select_mask
from .base import LinearStatistics, PaperReference, PruningMethod, register_method


@register_method
class WandaPruning(PruningMethod):
    """Pruning by weights and activations: no weight update, one forward pass of statistics per block."""

    name = "wanda"
    display_name = "Wanda"
    paper = PaperReference("A Simple and Effective Pruning Approach for Large Language Models",
                           "Sun, Liu, Bair and Kolter", 2023, "https://arxiv.org/abs/2306.11695")
    needs_calibration = True
    supports_patterns = ("unstructured", "n:m")
    statistics = frozenset({"sq_norm"})

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        input_norm = stats.sq_norm.sqrt()  # (in,)  ‖X_j‖₂ over all calibration tokens
        scores = weight.abs() * input_norm.unsqueeze(0)  # (out, in)
        # The paper compares weights within each output row: rows keep the same number of inputs.
        return weight, select_mask(scores, pattern, sparsity, per_row=True)
