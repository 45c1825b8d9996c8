"""Storage formats: compact N:M and bitmask encodings of pruned weights (:mod:`~hf_sparse.formats.compact`) and
checkpoint-folder conversion (:mod:`~hf_sparse.formats.checkpoint`)."""

from .checkpoint import checkpoint_bytes, compress_checkpoint, decompress_checkpoint
from .compact import (
    STORAGE_FORMAT,
    STORAGE_VERSION,
    StorageSummary,
    choose_encoding,
    compress_state_dict,
    compress_weight,
    decompress_state_dict,
    decompress_weight,
)

__all__ = [
    "STORAGE_FORMAT",
    "STORAGE_VERSION",
    "StorageSummary",
    "checkpoint_bytes",
    "choose_encoding",
    "compress_checkpoint",
    "compress_state_dict",
    "compress_weight",
    "decompress_checkpoint",
    "decompress_state_dict",
    "decompress_weight",
]
