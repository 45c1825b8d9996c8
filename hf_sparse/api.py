"""``prune``: the verb behind every entry point (prune on load, the CLI, scripts)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .calibration import load_calibration
from .config import SparsityConfig, describe_calibration
from .engine import LayerwiseEngine
from .methods import build_method
from .record import SparsityRecord, write_record
from .surgery import removed_fraction

logger = logging.getLogger(__name__)


def _load_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError("text calibration needs a tokenizer and the model has no name_or_path: pass tokenizer=...")
    return AutoTokenizer.from_pretrained(source)


def _calibration_entry(config: SparsityConfig, method, calibration_ids) -> dict | None:
    """The record's description of the calibration data actually used."""
    if not method.needs_calibration:
        return None
    calibration = describe_calibration(config.calibration) or config.calibration_descriptor
    if calibration is not None:
        calibration = {**calibration, "num_samples": int(calibration_ids.shape[0]),
                       "sequence_length": int(calibration_ids.shape[1]), "seed": config.seed}
    return calibration


@contextlib.contextmanager
def _inference_mode(model: nn.Module, seed: int):
    """Eval mode, no KV cache, and a seeded RNG forked from the caller's, all restored afterwards."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


def _prune_structured(model: nn.Module, config: SparsityConfig, method, calibration_ids,
                      show_progress: bool) -> SparsityRecord:
    """pattern="structured": the method decides block edits, surgery makes the modules smaller."""
    from .structured_pipeline import run_structured

    with _inference_mode(model, config.seed):
        structure = run_structured(model, method, calibration_ids, config.sparsity, batch_size=config.batch_size,
                                   device=config.device, show_progress=show_progress)
    record = SparsityRecord(
        method=config.method, pattern=config.pattern, target_sparsity=config.sparsity, modules={},
        method_options=method.options.to_dict(), calibration=_calibration_entry(config, method, calibration_ids),
        overall_sparsity=removed_fraction(structure), base_model=getattr(model, "name_or_path", None) or None,
        structure=structure,
    )
    write_record(model, record)
    logger.info("%s removed %.4f of the decoder-block parameters (%d -> %d), %d blocks removed", config.method,
                record.overall_sparsity, structure["original"]["block_parameters"], structure["block_parameters"],
                len(structure["removed_blocks"]))
    return record


def prune(model: nn.Module, config: SparsityConfig | dict, tokenizer=None, show_progress: bool = True) -> SparsityRecord:
    """Prune ``model`` in place as ``config`` says and record the result in ``model.config.sparsity_config``.

    The tokenizer is used for text calibration; by default it is ``config.tokenizer`` or loaded from the model's id.

    >>> cfg = hf_sparse.SparsityConfig(method="wanda", sparsity=0.5, calibration="calibration.txt",
    ...                                num_samples=32, sequence_length=256)  # doctest: +SKIP
    >>> record = hf_sparse.prune(model, cfg, tokenizer=tokenizer)  # doctest: +SKIP
    >>> record.overall_sparsity  # doctest: +SKIP
    0.5
    """
    if isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    if not isinstance(config, SparsityConfig):
        raise ValueError(f"config must be a hf_sparse.SparsityConfig or a dict, got {type(config).__name__}")
    method = build_method(config.method, config.method_options)
    calibration_ids = None
    if method.needs_calibration:
        if config.calibration is None:
            raise ValueError(
                f"method {config.method!r} needs calibration data: set SparsityConfig(calibration=...) to a dataset "
                "name, a text file or folder, a list of strings, or token ids"
            )
        is_tokens = isinstance(config.calibration, torch.Tensor) or (
            isinstance(config.calibration, (list, tuple)) and config.calibration
            and isinstance(config.calibration[0], (list, tuple))
        )
        if not is_tokens:
            tokenizer = tokenizer or config.tokenizer or _load_tokenizer(model)
        calibration_ids = load_calibration(
            config.calibration, tokenizer, config.num_samples, config.sequence_length, config.seed,
            split=config.calibration_split, column=config.calibration_column, subset=config.calibration_subset,
        )

    if config.parsed_pattern.is_structured:
        return _prune_structured(model, config, method, calibration_ids, show_progress)
    engine = LayerwiseEngine(
        method, config.parsed_pattern, lambda _name: config.sparsity, include=config.include, exclude=config.exclude,
        device=config.device, parallel=config.parallel, num_workers=config.num_workers, show_progress=show_progress,
    )
    # Seeded for reproducibility, in a forked RNG state so the caller's random stream is left as it was.
    with _inference_mode(model, config.seed):
        result = engine.run(model, calibration_ids, batch_size=config.batch_size)

    record = SparsityRecord(
        method=config.method, pattern=config.pattern, target_sparsity=config.sparsity,
        modules={name: round(value, 6) for name, value in result.achieved.items()},
        method_options=method.options.to_dict(), calibration=_calibration_entry(config, method, calibration_ids),
        overall_sparsity=round(result.overall_sparsity, 6),
        base_model=getattr(model, "name_or_path", None) or None,
    )
    write_record(model, record)
    logger.info("pruned %d modules with %s (%s): overall sparsity %.4f", len(record.modules), config.method,
                config.pattern, record.overall_sparsity)
    return record
