"""hf_sparse: post-training pruning of Hugging Face causal language models, one line in any script.

    import hf_sparse
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", sparsity=0.5, pattern="2:4", calibration="calibration.txt")
    model = AutoModelForCausalLM.from_pretrained(model_id, sparsity_config=cfg)   # prunes on load
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
    uninstall_from_pretrained_hook,
)
from .integrations import structured as _structured_loading  # noqa: F401  (registers the shape loader)
from . import hub, peft, recovery, training  # public submodules: `from hf_sparse.peft import get_sparse_peft_model`
from .integrations.compressed import install_save_hook  # save_pretrained(d, compressed=True); compact loading
from .integrations.loading_guard import install_config_hook  # reads config.json files guarded against plain loading
from . import formats, kernels  # compact storage; opt-in 2:4 kernels (hf_sparse.kernels.enable_2of4)
from .export import export_gguf  # GGUF files for llama.cpp

# `hf_sparse.evaluate` is the first wave's name for the evaluation module; `import hf_sparse.evaluate` works too.
evaluate = evaluation
_sys.modules[f"{__name__}.evaluate"] = evaluation

# `from_pretrained(..., sparsity_config=cfg)` works once hf_sparse is imported; uninstall_from_pretrained_hook() undoes it.
install_from_pretrained_hook()
install_save_hook()
install_config_hook()

__version__ = "0.1.0"

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
