"""What the engine asks of a pruning method: the side of the contract :class:`hf_sparse.methods.PruningMethod`
implements.

The engine sits below the methods (a method file imports the engine's statistics and session; the engine never
imports a method), so the engine states here what it calls, and runs any object that has it.

>>> from hf_sparse.methods import build_method
>>> isinstance(build_method("wanda"), MethodProtocol)
True
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..masks import SparsityPattern
from .statistics import LinearStatistics


@runtime_checkable
class MethodProtocol(Protocol):
    """A pruning method as the engine runs it (see :class:`hf_sparse.methods.PruningMethod` for each member)."""

    name: str
    #: statistics collected for every pruned linear (names in :data:`hf_sparse.engine.statistics.STATISTICS`)
    statistics: frozenset[str]
    needs_calibration: bool
    propagate_dense: bool
    edits_structure: bool

    @property
    def sequential_within_block(self) -> bool: ...

    def statistics_for(self, module: nn.Module) -> frozenset[str]: ...

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]: ...
