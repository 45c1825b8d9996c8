"""Configuration: :class:`SparsityConfig` (what to prune and how) and the sparsity profiles.

``from hf_sparse.config import SparsityConfig, QUANT_METHOD``. The validator every option dataclass uses is
:mod:`hf_sparse.validation`, a layer below (the calibration descriptors and the method options use it too).
"""

from .sparsity import QUANT_METHOD, SparsityConfig

__all__ = ["QUANT_METHOD", "SparsityConfig"]
