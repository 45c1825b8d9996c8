"""ShortGPT (Men et al., 2024): remove the decoder blocks that change their input the least.

Block influence BI_i = 1 − cos(h_in, h_out), averaged over every calibration token (the windows carry no padding);
the last block's output is taken before the final norm, as every block's is. The lowest-BI blocks go in one shot.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from ..surgery import StructuredEdits
from .base import PaperReference, register_method
from .structured import StructuredPruningMethod, blocks_for_fraction

if TYPE_CHECKING:
    from ..engine.structured import StructuredSession

logger = logging.getLogger(__name__)


def block_influence(session: StructuredSession) -> list[float]:
    """BI of every block of the dense model, in order."""
    influence = []
    for step in session.dense_block_passes(desc="block influence"):
        total, tokens = 0.0, 0
        for h_in, h_out in zip(step.inputs, step.outputs):
            cosine = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (batch, seq)
            total += (1.0 - cosine).sum(dtype=torch.float64).item()
            tokens += cosine.numel()
        influence.append(total / tokens)
    return influence


@register_method
class ShortGPTPruning(StructuredPruningMethod):
    """Layer removal by block influence, one calibration pass."""

    name = "shortgpt"
    display_name = "ShortGPT"
    paper = PaperReference("ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
                           "Men et al.", 2024, "https://arxiv.org/abs/2403.03853")
    removes = ("blocks",)

    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        session.require("blocks")
        count = blocks_for_fraction(session.num_blocks, sparsity)
        influence = block_influence(session)
        order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
        logger.info("shortgpt block influence: %s; removing %s", [round(b, 5) for b in influence], order[:count])
        return StructuredEdits(removed_blocks=tuple(order[:count]))
