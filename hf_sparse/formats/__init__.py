"""Storage formats: compact N:M and bitmask encodings of pruned weights (see :mod:`hf_sparse.formats.compact`)."""

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
    "choose_encoding",
    "compress_state_dict",
    "compress_weight",
    "decompress_state_dict",
    "decompress_weight",
]
