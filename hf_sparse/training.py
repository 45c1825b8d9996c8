"""Keep a pruned model's zeros through full fine-tuning: ``from hf_sparse.training import KeepSparsityCallback``.

The public home of :mod:`hf_sparse.recovery.mask_keeper` (the mask keeper lives with the recovery code that uses it),
so that ``import hf_sparse.training`` keeps working.

>>> from hf_sparse.training import KeepSparsityCallback, MaskKeeper, keep_sparsity
>>> KeepSparsityCallback().keeper is None
True
"""

from .recovery.mask_keeper import *  # noqa: F403  (the mask keeper's __all__ is this module's public API)
from .recovery.mask_keeper import __all__  # noqa: F401
