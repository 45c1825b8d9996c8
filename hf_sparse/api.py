"""``prune``: the verb behind every entry point (prune on load, the CLI, scripts)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .calibration.domain import check_domain
from .calibration.mixes import load_mix
from .calibration import (
    check_fits_model,
    check_source,
    describe_calibration,
    describe_local_folder,
    is_token_source,
    load_calibration,
    tokenizer_for,
)
from .config import SparsityConfig
from .config.profiles import UNIFORM, allocate, check_profile_fits
from .engine import LayerwiseEngine, TargetSparsity, plan_targets
from .integrations.gguf import check_gguf_weights_dense, detach_gguf, gguf_source
from .methods import build_method
from .record import SparsityRecord, merge_records, overall_sparsity, read_record, write_record
from .architectures import get_architecture
from .surgery import mark_for_loading, parameters_per_block, removed_fraction, removed_per_block

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _inference_mode(model: nn.Module, seed: int):
    """Eval mode, no KV cache, and a seeded RNG forked from the caller's (so the caller's random stream is left as it
    was), all restored afterwards."""
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


def _provenance(model: nn.Module, config: SparsityConfig, method, calibration_ids, gguf=None) -> dict:
    """The record fields that say how the model was pruned: options, calibration actually used, base model (a GGUF
    file by its name and content hash: the folder it was read from is a local path)."""
    # Calibration ids exist exactly when the method (or the sparsity profile, e.g. OWL) read calibration data.
    used_calibration = calibration_ids is not None
    calibration = describe_calibration(config.calibration, config.calibration_weights) \
        or config.calibration_descriptor
    if calibration is not None and used_calibration:
        calibration = {**calibration, "num_samples": int(calibration_ids.shape[0]),
                       "sequence_length": int(calibration_ids.shape[1]), "seed": config.seed}
    if gguf is not None:
        base_model, base_model_sha256 = gguf.name, gguf.sha256()
    else:
        base_model, base_model_sha256 = describe_local_folder(getattr(model, "name_or_path", None) or None)
    return {"method_options": method.recorded_options(config.parsed_pattern),
            "calibration": calibration if used_calibration else None,
            "base_model": base_model, "base_model_sha256": base_model_sha256}


def _prune_structured(model: nn.Module, config: SparsityConfig, method, calibration_ids, previous,
                      show_progress: bool, gguf=None, domain_report=None) -> SparsityRecord:
    """pattern="structured": the engine's structured pipeline lets the method decide block edits, and the surgery
    makes the modules smaller. A non-uniform sparsity profile is planned by the same :func:`allocate` as for
    unstructured methods (OWL's dense statistics pass included) and handed to the method as per-block shares."""
    if previous is not None:
        raise ValueError(f"this model was already pruned ({previous.method}, {previous.pattern}); structured pruning "
                         "changes every shape and starts from the dense model")
    engine = LayerwiseEngine(method, config.parsed_pattern, config.sparsity, device=config.device,
                             show_progress=show_progress)
    adapter = get_architecture(model)
    dense_sizes = parameters_per_block(adapter, model)
    allocation = None
    with _inference_mode(model, config.seed):
        if config.sparsity_profile != UNIFORM:
            # A block's share is of all its parameters (what structured sparsity counts): OWL weighs blocks by them.
            allocation = allocate(config.sparsity_profile, config.profile_options, config.sparsity, engine, model,
                                  calibration_ids, config.batch_size, block_sizes=dict(enumerate(dense_sizes)))
            engine.sparsity = TargetSparsity.per_module(allocation.module_sparsity, blocks=allocation.block_sparsity)
        structure = engine.run(model, calibration_ids, batch_size=config.batch_size).structure
    if gguf is not None:
        detach_gguf(model)  # the smaller weights are plain tensors: drop the GGUF quantizer so save_pretrained works
        mark_for_loading(model, structure)  # detaching removed the config's quantization_config: the marker too
    profile = None
    if allocation is not None:
        achieved = removed_per_block(adapter, model, structure, dense_sizes)
        profile = {**allocation.to_record(),
                   "block_achieved": {str(i): round(share, 6) for i, share in achieved.items()}}
    record = SparsityRecord(
        method=config.method, pattern=config.pattern, target_sparsity=config.sparsity, modules={},
        overall_sparsity=removed_fraction(structure), structure=structure, sparsity_profile=profile,
        domain_check=domain_report.to_dict() if domain_report is not None else None,
        **_provenance(model, config, method, calibration_ids, gguf),
    )
    write_record(model, record)
    logger.info("%s removed %.4f of the decoder-block parameters (%d -> %d), %d blocks removed", config.method,
                record.overall_sparsity, structure["original"]["block_parameters"], structure["block_parameters"],
                len(structure["removed_blocks"]))
    return record


def prune(model: nn.Module, config: SparsityConfig | dict, tokenizer=None, show_progress: bool = True) -> SparsityRecord:
    """Prune ``model`` in place as ``config`` says and record the result in ``model.config.sparsity_config``.

    The tokenizer is used for text calibration; by default it is ``config.tokenizer`` or loaded from the model's id.
    A model pruned before keeps its earlier zeros: the new record lists the modules of every pass (``passes``).

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
    config.validate()  # again: a field may have been changed since the config was built
    method = build_method(config.method, config.method_options)
    previous = read_record(model)  # an earlier pass (validated: a bad record raises before anything is pruned)
    gguf = gguf_source(model)  # loaded from a .gguf file: its weights must be dense, its tokenizer is in the file
    if gguf is not None:
        check_gguf_weights_dense(model)
    if config.sparsity_profile != UNIFORM:
        # An explicit profile that does not fit this model fails before any calibration data is read. Structured
        # methods remove units of whole blocks: include/exclude do not apply to them.
        include, exclude = (None, None) if config.parsed_pattern.is_structured else (config.include, config.exclude)
        check_profile_fits(plan_targets(model, include, exclude, config.parsed_pattern, config.sparsity),
                           config.sparsity_profile, config.sparsity)
    calibration_ids = None
    if config.needs_calibration:  # the method's statistics, or the profile's (OWL)
        check_source(config.calibration, config.calibration_reader)
        mixed = config.calibration_weights is not None
        sources = list(config.calibration) if mixed else [config.calibration]
        for source in sources:
            check_fits_model(source, config.sequence_length, model)
        if not all(is_token_source(source) for source in sources):
            tokenizer = tokenizer or config.tokenizer or (gguf.load_tokenizer() if gguf else tokenizer_for(model))
        options = dict(split=config.calibration_split, column=config.calibration_column,
                       subset=config.calibration_subset)
        if mixed:
            calibration_ids = load_mix(sources, config.calibration_weights, tokenizer, config.num_samples,
                                       config.sequence_length, config.seed, **options)
        else:
            calibration_ids = load_calibration(config.calibration, tokenizer, config.num_samples,
                                               config.sequence_length, config.seed, **options)
    domain_report = None
    if config.target_data is not None:
        if calibration_ids is None:
            raise ValueError(f"target_data is compared with the calibration data, and method {config.method!r} "
                             "uses none: set calibration=... or leave target_data out")
        domain_report = check_domain(model, calibration_ids, config.target_data,
                                     tokenizer or config.tokenizer or tokenizer_for(model), config.batch_size)

    if config.parsed_pattern.is_structured:
        return _prune_structured(model, config, method, calibration_ids, previous, show_progress, gguf,
                                 domain_report)
    engine = LayerwiseEngine(
        method, config.parsed_pattern, lambda _name: config.sparsity, include=config.include, exclude=config.exclude,
        device=config.device, parallel=config.parallel, num_workers=config.num_workers, show_progress=show_progress,
    )
    allocation = None
    with _inference_mode(model, config.seed):
        if config.sparsity_profile != UNIFORM:
            # The profile's targets first (OWL: one dense statistics pass), then the pruning pass with them.
            allocation = allocate(config.sparsity_profile, config.profile_options, config.sparsity, engine,
                                  model, calibration_ids, config.batch_size)
            engine.sparsity = TargetSparsity.per_module(allocation.module_sparsity)
        result = engine.run(model, calibration_ids, batch_size=config.batch_size)

    if gguf is not None:
        detach_gguf(model)  # pruned weights are plain tensors: drop the GGUF quantizer so save_pretrained works
    record = SparsityRecord(
        method=config.method, pattern=config.pattern, target_sparsity=config.sparsity,
        modules={name: round(value, 6) for name, value in result.achieved.items()},
        overall_sparsity=round(result.overall_sparsity, 6), **_provenance(model, config, method, calibration_ids, gguf),
        sparsity_profile=allocation.to_record() if allocation is not None else None,
        domain_check=domain_report.to_dict() if domain_report is not None else None,
        target_modules=({name: round(value, 6) for name, value in allocation.module_sparsity.items()}
                        if allocation is not None else None),
    )
    if previous is not None:
        # Pruned before (another include, another method): the record keeps every pass's modules, so get_masks
        # and the mask keeper still see the earlier zeros.
        record = merge_records(previous, record)
        record.overall_sparsity = round(overall_sparsity(model, record.modules), 6)
        logger.info("merged with the earlier sparsity record: %d passes, %d modules", len(record.passes),
                    len(record.modules))
    write_record(model, record)
    logger.info("pruned %d modules with %s (%s): overall sparsity %.4f", len(record.modules), config.method,
                config.pattern, record.overall_sparsity)
    return record
