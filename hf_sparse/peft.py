"""Sparsity-keeping PEFT adapters: ``from hf_sparse.peft import get_sparse_peft_model``.

The public home of :mod:`hf_sparse.integrations.peft` (where the peft-specific code lives, beside the other
integrations), so that ``import hf_sparse.peft`` and ``from hf_sparse.peft import ...`` work as the README writes them.

>>> from hf_sparse.peft import get_sparse_peft_model, MODES
>>> MODES
('masked', 'merge')
"""

from .integrations.peft import *  # noqa: F403  (the integration's __all__ is this module's public API)
from .integrations.peft import __all__  # noqa: F401
