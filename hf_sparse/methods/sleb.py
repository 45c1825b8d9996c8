"""SLEB (Song et al., ICML 2024): greedy block elimination by calibration loss.

At each step every remaining candidate block is bypassed in turn and the calibration negative log-likelihood is
measured; the block whose removal raises it least goes, and the search repeats on the shortened model. As in the
authors' code (jiwonsong-dev/SLEB: ``early_barrier`` / ``latter_barrier``), the first and the last remaining block are
not candidates by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from typing import TYPE_CHECKING

from ..surgery import StructuredEdits
from .base import MethodOptions, PaperReference, register_method
from .structured import StructuredPruningMethod, blocks_for_fraction

if TYPE_CHECKING:
    from ..engine.structured import StructuredSession

logger = logging.getLogger(__name__)


@dataclass
class SLEBOptions(MethodOptions):
    protect_first: int = field(default=1, metadata={"help": "Remaining blocks at the start that are never removed."})
    protect_last: int = field(default=1, metadata={"help": "Remaining blocks at the end that are never removed."})

    def __post_init__(self):
        for name in ("protect_first", "protect_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sleb option {name} must be a non-negative integer, got {value!r}")


@register_method
class SLEBPruning(StructuredPruningMethod):
    """Greedy, iterative layer removal: one calibration forward per candidate per step."""

    name = "sleb"
    display_name = "SLEB"
    paper = PaperReference("SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks",
                           "Song et al.", 2024, "https://arxiv.org/abs/2402.09025")
    removes = ("blocks",)
    options_class = SLEBOptions

    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        session.require("blocks")
        count = blocks_for_fraction(session.num_blocks, sparsity)
        first, last = self.options.protect_first, self.options.protect_last
        alive = list(range(session.num_blocks))
        if len(alive) - count < first + last:
            raise ValueError(f"removing {count} of {len(alive)} blocks leaves fewer than protect_first + protect_last "
                             f"= {first + last}; lower them in method_options")
        evaluations = sum(len(alive) - step - first - last for step in range(count))
        progress = tqdm(total=evaluations, desc="sleb block search", unit="forward", disable=not session.show_progress)
        removed: list[int] = []
        for _ in range(count):
            candidates = alive[first: len(alive) - last]
            losses = {}
            for candidate in candidates:
                losses[candidate] = session.calibration_nll(set(removed) | {candidate})
                progress.update()
            best = min(candidates, key=lambda i: (losses[i], i))
            logger.info("sleb: removing block %d (calibration NLL %.4f)", best, losses[best])
            removed.append(best)
            alive.remove(best)
        progress.close()
        return StructuredEdits(removed_blocks=tuple(removed))
