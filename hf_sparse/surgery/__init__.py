"""Structured surgery: block edits as data (:mod:`.edits`), the one module that applies them (:mod:`.apply`), and the
shape record that lets a smaller model be saved and loaded again (:mod:`.structure`)."""

from .apply import BlockShape, apply_edits, block_shape, remove_blocks
from .edits import RESIDUAL_POINTS, AttentionEdit, BlockEdit, MLPEdit, ResidualEdit, StructuredEdits
from .residual import masked_residual
from .structure import (
    STRUCTURED_QUANT_METHOD,
    apply_and_describe,
    block_parameters,
    check_loaded_structure,
    check_structure_fits,
    describe_structure,
    finish_config,
    mark_for_loading,
    original_description,
    parameters_per_block,
    removed_fraction,
    removed_per_block,
    shape_rows,
    shape_summary,
    shrink_to_structure,
    unit_parameters,
    validate_structure,
)

__all__ = [
    "AttentionEdit", "BlockEdit", "BlockShape", "MLPEdit", "RESIDUAL_POINTS", "ResidualEdit", "STRUCTURED_QUANT_METHOD",
    "StructuredEdits", "masked_residual",
    "apply_and_describe", "apply_edits", "block_parameters", "block_shape", "describe_structure", "finish_config", "mark_for_loading", "original_description",
    "parameters_per_block", "remove_blocks", "removed_fraction", "removed_per_block", "shape_rows", "shape_summary", "shrink_to_structure", "unit_parameters", "validate_structure", "check_loaded_structure", "check_structure_fits",
]
