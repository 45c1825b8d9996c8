"""Everything ``import hf_sparse`` makes available, and the hooks it installs in transformers.

:mod:`hf_sparse` imports this module at once (``import hf_sparse`` then works as documented), except in the process
of the ``hf-sparse`` command, which imports it only once a subcommand runs: ``hf-sparse --help`` and argument
errors never pay for torch and transformers.
"""

import sys as _sys

from . import evaluation
from .api import prune
from .config import SparsityConfig
from .masks import SparsityPattern
from .methods import METHODS, PruningMethod, register_method
from .record import SparsityRecord, get_masks, read_record
from .integrations.transformers import (
    AutoSparseModelForCausalLM,
    install_from_pretrained_hook,
    set_prune_function,
    uninstall_from_pretrained_hook,
)
from .integrations import structured as _structured_loading  # noqa: F401  (registers the shape loader)
from . import hub, peft, recovery, training  # public submodules: `from hf_sparse.peft import get_sparse_peft_model`
from .integrations.compressed import install_save_hook  # save_pretrained(d, compressed=True); compact loading
from .integrations.loading_guard import install_config_hook  # model types of checkpoints only hf_sparse loads
from . import formats, kernels  # compact storage; opt-in 2:4 kernels (hf_sparse.kernels.enable_2of4)
from .export import export_gguf  # GGUF files for llama.cpp

# `hf_sparse.evaluate` is the first wave's name for the evaluation module; `import hf_sparse.evaluate` works too.
evaluate = evaluation
_sys.modules["hf_sparse.evaluate"] = evaluation

# Prune on load calls the api's verb; the integrations are a layer below the api, so it is handed to them here.
set_prune_function(prune)
# `from_pretrained(..., sparsity_config=cfg)` works once hf_sparse is imported; uninstall_from_pretrained_hook()
# undoes it.
install_from_pretrained_hook()
install_save_hook()
install_config_hook()

__all__ = [
    "AutoSparseModelForCausalLM",
    "METHODS",
    "PruningMethod",
    "SparsityConfig",
    "SparsityPattern",
    "SparsityRecord",
    "evaluate",
    "evaluation",
    "export_gguf",
    "formats",
    "get_masks",
    "hub",
    "kernels",
    "install_from_pretrained_hook",
    "peft",
    "prune",
    "read_record",
    "recovery",
    "register_method",
    "training",
    "uninstall_from_pretrained_hook",
]
