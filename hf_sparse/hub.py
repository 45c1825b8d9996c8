"""Model cards and Hub uploads for pruned checkpoints: ``from hf_sparse.hub import save_with_model_card``.

The public home of :mod:`hf_sparse.integrations.hub`, so that ``import hf_sparse.hub`` and
``from hf_sparse.hub import ...`` work as the README writes them.

>>> from hf_sparse.hub import save_with_model_card, push_to_hub
"""

from .integrations.hub import *  # noqa: F403  (the integration's __all__ is this module's public API)
from .integrations.hub import __all__  # noqa: F401
