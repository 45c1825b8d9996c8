"""hf_sparse: post-training pruning of Hugging Face causal language models, one line in any script.

    import hf_sparse
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", sparsity=0.5, pattern="2:4", calibration="calibration.txt")
    model = AutoModelForCausalLM.from_pretrained(model_id, sparsity_config=cfg)   # prunes on load
"""

from . import evaluation as evaluate
from .api import prune
from .config import SparsityConfig
from .masks import SparsityPattern
from .methods import METHODS, PruningMethod, register_method
from .record import SparsityRecord, get_masks, read_record

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "PruningMethod",
    "SparsityConfig",
    "SparsityPattern",
    "SparsityRecord",
    "evaluate",
    "get_masks",
    "prune",
    "read_record",
    "register_method",
]
