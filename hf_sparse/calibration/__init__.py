"""Calibration data: sources (files, folders, datasets, strings, token ids) -> token windows, and the descriptors
the record keeps of them (names and hashes, never the data or a local path)."""

from .descriptors import CalibrationDescriptor, check_descriptor, content_sha256, describe_calibration, describe_local_folder
from .sources import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    check_fits_model,
    check_source,
    is_token_source,
    load_calibration,
    looks_like_path,
    missing_path,
    read_texts,
    sample_windows,
    tokenizer_for,
)

__all__ = ["CalibrationDescriptor", "JSON_SUFFIXES", "TEXT_SUFFIXES", "check_descriptor", "check_fits_model",
           "check_source", "content_sha256", "describe_calibration", "describe_local_folder", "is_token_source",
           "load_calibration", "looks_like_path", "missing_path", "read_texts", "sample_windows", "tokenizer_for"]
