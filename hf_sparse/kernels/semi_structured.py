"""``SemiStructuredSparseLinear``: an ``nn.Linear`` whose 2:4 weight also lives as a cuSPARSELt sparse tensor.

The dense weight stays (it is the state dict, the decode path and the fallback), so the module costs the dense
weight plus the compressed copy (about 0.56x more in fp16). Each call picks the kernel from the dispatch table by the
weight shape and the number of tokens in the call; anything the table does not cover runs the dense ``F.linear``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import DispatchTable

logger = logging.getLogger(__name__)

# cuSPARSELt's 2:4 matmul takes these weight dtypes for F.linear (int8/float8 need scaled matmuls, not F.linear).
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# Both weight dimensions must be multiples of this for fp16/bf16 in cuSPARSELt (torch's shape constraints).
SHAPE_MULTIPLE = 16


def to_cusparselt(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 weight as a cuSPARSELt semi-structured tensor (never the CUTLASS default path, measured far slower)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    return SparseSemiStructuredTensorCUSPARSELT.from_dense(weight.detach().contiguous())


class SemiStructuredSparseLinear(nn.Module):
    """Drop-in for a 2:4-pruned ``nn.Linear``: same parameters, same state dict, dense or sparse kernel per call.

    On CPU (or before :meth:`compress`) it is exactly the dense linear:

    >>> linear = nn.Linear(32, 16)
    >>> module = SemiStructuredSparseLinear(linear, DispatchTable("H100", {(16, 32): 4096}))
    >>> x = torch.randn(3, 32)
    >>> torch.equal(module(x), linear(x)), module.last_path
    (True, 'dense')
    """

    def __init__(self, linear: nn.Linear, table: DispatchTable):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: no copy, and the state dict keeps nn.Linear's keys
        self.bias = linear.bias
        self.table = table
        self._sparse: torch.Tensor | None = None  # derived from weight; never in the state dict
        self.last_path = "dense"  # which kernel the last call used (for tests and benchmarks)

    def compress(self) -> None:
        """Build the cuSPARSELt copy of the weight (needs a CUDA weight in float16/bfloat16)."""
        self._sparse = to_cusparselt(self.weight)

    def release(self) -> None:
        self._sparse = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        sparse = (self._sparse is not None and self.table.use_sparse(self.out_features, self.in_features, tokens)
                  # Training needs the dense weight's gradient; the sparse copy is an inference kernel.
                  and not (torch.is_grad_enabled() and self.weight.requires_grad))
        self.last_path = "sparse" if sparse else "dense"
        return F.linear(x, self._sparse if sparse else self.weight, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() move the weight; the sparse copy is rebuilt from it rather than left stale.
        had_sparse = self._sparse is not None
        self._sparse = None
        result = super()._apply(fn, recurse)
        if had_sparse and self.weight.is_cuda and self.weight.dtype in SPARSE_DTYPES:
            self.compress()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self._sparse is not None:  # new weights: the old sparse copy would compute with the old ones
            self.compress()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparse={'cusparselt' if self._sparse is not None else 'off'}, table={self.table.device}")
