"""Compact checkpoints in transformers: ``save_pretrained(d, compressed=True)`` and a decompressing ``from_pretrained``.

Saving: ``import hf_sparse`` teaches ``PreTrainedModel.save_pretrained`` the ``compressed=True`` keyword
(:func:`install_save_hook`). The pruned linears of the record are written in their smallest compact form
(:mod:`hf_sparse.formats.compact`), the record gets a ``storage`` entry and ``config.json`` a ``quantization_config``
with ``quant_method: "hf_sparse_compact"``; transformers' own writer does the rest (shards, index, config).

Loading uses transformers' native path for pre-quantized checkpoints: the ``"hf_sparse_compact"`` quantizer
registered here declares the stored names of a weight (``weight``, ``weight_positions``, ``weight_bitmask``,
``weight_layout``) and a *dequantize* operation, so the core loader gathers the entries of one weight (across shards,
read on the CPU as stored) and decodes them right before the weight is set and moved to the device ``device_map``
gives it: one dense matrix at a time (see :class:`CompactStorageQuantizer` for the memory bound).
After loading the quantizer removes every trace of itself, as the prune-on-load quantizer does: the result is a plain
dense model (its weights bit-identical to the pruned model that was saved), ready for PEFT, ``get_masks`` or saving.

Without hf_sparse, transformers 5 does not raise on an unknown ``quant_method`` (it logs "Unknown quantization type"
and loads as if dense), so ``config.json`` also says ``model_type: "hf_sparse_compact"``
(:mod:`hf_sparse.formats.guard`): without hf_sparse, transformers stops reading the config with its own "does not
recognize this architecture" naming that type, before any weight is read. Were the type changed back by hand, the
stored values still do not fit the layers (half the columns for 2:4, a flat vector for a bitmask): loading stops on
the size mismatch instead of producing wrong weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import shown
from ..formats.checkpoint import compact_record, verify_compact
from ..formats.compact import (
    COMPANIONS, LAYOUT, STORAGE_FORMAT, STORAGE_VERSION, VALUES, compress_state_dict, decompress_weight, module_patterns,
    quantization_config_entry,
)
from ..record import RECORD_KEY, read_record, write_record
from .loading_guard import guarded_save
from .transformers import PlainModelQuantizer, register_under, remove_quantization_state

logger = logging.getLogger(__name__)


class CompactStorageConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compact checkpoint (``{"quant_method": "hf_sparse_compact", ...}``).

    It is only ever read from a checkpoint's ``config.json``: the weights are decompressed on load, so the loaded model
    is dense and keeps no quantization config.

    >>> CompactStorageConfig().to_dict()
    {'quant_method': 'hf_sparse_compact', 'format_version': 1}
    """

    # Read by HfQuantizer.get_weight_conversions / postprocess_model: decode on load, then drop the config.
    dequantize = True

    def __init__(self, quant_method: str = STORAGE_FORMAT, format_version: int = STORAGE_VERSION, **kwargs: Any):
        if quant_method != STORAGE_FORMAT:
            raise ValueError(f"CompactStorageConfig is for quant_method {shown(STORAGE_FORMAT)}, got {shown(quant_method)}")
        if format_version != STORAGE_VERSION:
            raise ValueError(f"this checkpoint uses {STORAGE_FORMAT} format_version {shown(format_version)}; this hf_sparse "
                             f"reads version {STORAGE_VERSION} (upgrade hf_sparse)")
        self.quant_method = quant_method
        self.format_version = format_version


class DecompressCompactWeight(ConversionOps):
    """Loader operation: the stored entries of one weight (values, positions or bitmask, layout) -> the dense weight.

    Entries of a weight that was stored dense (embeddings, norms, ...) arrive alone and pass through (cast if needed).
    The entries arrive as the checkpoint stores them (zero-copy views of the memory-mapped file, see
    :meth:`CompactStorageQuantizer.get_new_dtype`); the op decodes and casts them in row chunks, so the one full-size
    tensor it allocates is the dense weight it returns.
    """

    def __init__(self, quantizer: HfQuantizer):
        self.quantizer = quantizer
        self.quantizer_name = quantizer.quantization_config.quant_method
        self.dtype: torch.dtype | None = None  # the dtype transformers chose for this parameter (set while reading)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, **kwargs) -> dict[str, Any]:
        parts = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        if VALUES not in parts:
            raise ValueError(f"{full_layer_name}: compact entries {sorted(parts)} without the {shown(VALUES)} values")
        dtype = self.dtype if self.dtype is not None and parts[VALUES].is_floating_point() else None
        # Entries the quantizer checked before loading (every file, against the record and the model) are decoded
        # as they are; otherwise (a state_dict handed to from_pretrained) they are checked here.
        verified = getattr(self.quantizer, "verified", False)
        dense = decompress_weight(parts, dtype, module=(full_layer_name or "").removesuffix(f".{VALUES}"),
                                  verify=not verified)
        if LAYOUT in parts:
            _return_freed_heap()
        return {full_layer_name or VALUES: dense}


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` on other C libraries (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _return_freed_heap() -> None:
    """Give the decoder's freed chunk buffers back to the OS (glibc only; elsewhere a no-op).

    Without it glibc keeps them in its heap between weights, fragmented by the small allocations of the loader:
    loading a 144 MiB float16 random Llama as float32, RssAnon after the load was 18-24 MiB above that of the dense
    checkpoint without this call, 0.2 MiB above with it; a call took 0.08 ms (decoding one of its matrices takes
    tens of milliseconds).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class CompactStorageQuantizer(PlainModelQuantizer):
    """Decompresses a compact checkpoint while transformers loads it; leaves a plain dense model behind.

    Memory: transformers reads checkpoint entries ahead of use in reader threads. Every ``*.weight`` entry family
    is read here *as stored* (no cast, on the CPU: a zero-copy view of the memory-mapped file, so reading ahead
    allocates nothing), and one weight at a time is decoded, cast in row chunks, and moved to the device
    ``device_map`` gives it. Peak: the loaded model plus one decompressed matrix plus the work tensors of one row
    chunk (a few MiB at most, :data:`hf_sparse.formats.bits.DECODE_CHUNK_ELEMENTS`).
    """

    # Only a checkpoint written in compact storage can be loaded through it (never "quantize on the fly").
    requires_calibration = True
    serialized_names = {VALUES: [VALUES, *COMPANIONS]}

    def get_load_operations(self) -> dict:
        return {"dequantize": DecompressCompactWeight}

    def get_weight_conversions(self) -> list:
        # force_cpu: read the entries on the CPU (views of the mapped file), decode there, then move the dense weight
        # to its device; reading the compressed entries onto a GPU ahead of use would hold them all there at once.
        return [WeightConverter(names, param, [DecompressCompactWeight(self)], force_cpu=True)
                for param, names in self.serialized_names.items()]

    def get_new_dtype(self, converter, param, dtype: torch.dtype | None) -> torch.dtype | None:
        """Read the entries of a compact weight without casting (``None``); the op casts after decoding.

        A cast while reading would copy every value in the reader threads, ahead of use: for a float16 checkpoint
        loaded in float32, all stored values at once. The dtype transformers chose is kept for the op instead."""
        ops = [op for op in getattr(converter, "operations", ()) if isinstance(op, DecompressCompactWeight)]
        if not ops:
            return super().get_new_dtype(converter, param, dtype)
        for op in ops:
            op.dtype = dtype
        return None

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None,
                                             **kwargs) -> PreTrainedModel:
        """Check every compressed weight of the checkpoint before any is read into the model: entries against each
        other, against the model's shapes and against the record (pattern, sparsity, content hash). A damaged or
        edited checkpoint stops here with one ``ValueError`` naming the weight (an error raised while transformers
        converts a weight would only be logged, then reported as a generic conversion failure)."""
        self.verified = False
        files = [f for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        if files:
            where = repr(os.path.dirname(str(files[0])))
            record = compact_record(model.config.to_dict(), where)
            verify_compact(files, record, where, shapes=_weight_shapes(model))
            self.verified = True
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        remove_quantization_state(model)
        record = read_record(model)
        if record is not None and record.storage is not None:
            record.storage = None  # the weights in memory are dense: saving them again writes a dense checkpoint
            write_record(model, record)
        return model


def _weight_shapes(model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of the (meta-device) model, under its own names and, for a base model loaded from
    a checkpoint of the full model, under the checkpoint's (``model.layers...`` for ``layers...``)."""
    shapes = {}
    prefix = getattr(model, "base_model_prefix", "")
    for name, param in model.named_parameters():
        if name.endswith(f".{VALUES}"):
            module = name.removesuffix(f".{VALUES}")
            shapes[module] = tuple(param.shape)
            if prefix and not module.startswith(f"{prefix}."):
                shapes.setdefault(f"{prefix}.{module}", tuple(param.shape))
    return shapes


register_under(STORAGE_FORMAT, CompactStorageConfig, CompactStorageQuantizer)


def save_compressed(model: PreTrainedModel, save_directory: str | os.PathLike, *args,
                    state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
    """``model.save_pretrained(save_directory, ...)`` with the pruned linears in compact storage.

    Needs the model's sparsity record (the modules and pattern to compress). All of ``save_pretrained``'s keywords
    (``max_shard_size``, ``push_to_hub``, ...) work as usual.

    >>> model.save_pretrained("pruned-compact", compressed=True)  # doctest: +SKIP
    """
    record = read_record(model)
    if record is None:
        raise ValueError(f"compressed=True needs a pruned model: this one has no {shown(RECORD_KEY)} record "
                         "(prune it with hf_sparse first)")
    if getattr(model, "_hf_peft_config_loaded", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("compressed=True saves a plain pruned model; merge or remove PEFT adapters and quantization "
                         "first (model.merge_and_unload())")
    marker = getattr(model.config, "quantization_config", None)
    if marker is not None:
        method = marker.get("quant_method") if isinstance(marker, dict) else getattr(marker, "quant_method", None)
        raise ValueError(f"compressed=True cannot keep the config's quantization_config (quant_method={shown(method)}: "
                         "a structured model whose blocks differ needs it to load); save it without compressed=True")
    if not record.modules:
        raise ValueError("compressed=True drops the zeros of pruned linears, and this record lists none (structured "
                         "pruning made the matrices smaller instead); save it without compressed=True")
    compact, summary = compress_state_dict(state_dict if state_dict is not None else model.state_dict(),
                                           module_patterns(record), record.modules)
    original_storage, config = record.storage, model.config
    had_quantization_config = "quantization_config" in vars(config)
    record.storage = summary.record_entry()
    write_record(model, record)
    config.quantization_config = CompactStorageConfig()
    try:
        with guarded_save(config):
            _ORIGINAL_SAVE(model, save_directory, *args, state_dict=compact, **kwargs)
    finally:
        if not had_quantization_config:
            del config.quantization_config
        record.storage = original_storage
        write_record(model, record)
    logger.info("saved %s in compact storage: %.4f of the dense tensor bytes (%s)", save_directory,
                summary.stored_bytes / max(summary.dense_bytes, 1), quantization_config_entry()["quant_method"])


_ORIGINAL_SAVE = PreTrainedModel.save_pretrained


@functools.wraps(_ORIGINAL_SAVE)
def _save_pretrained(self, save_directory, *args, compressed: bool = False, **kwargs):
    if compressed:
        return save_compressed(self, save_directory, *args, **kwargs)
    with guarded_save(self.config):  # a structured model whose blocks differ: config.json gets the loading guard
        return _ORIGINAL_SAVE(self, save_directory, *args, **kwargs)


_save_pretrained._hf_sparse_hook = True


def install_save_hook() -> None:
    """Teach ``PreTrainedModel.save_pretrained`` the ``compressed=True`` keyword (idempotent; ``import hf_sparse``
    calls it). Without the keyword ``save_pretrained`` is unchanged, except that a model only hf_sparse can load
    (a structured model whose blocks differ) gets the loading guard in its ``config.json``
    (:mod:`hf_sparse.integrations.loading_guard`).

    >>> install_save_hook(); is_save_hook_installed()
    True
    """
    PreTrainedModel.save_pretrained = _save_pretrained


def uninstall_save_hook() -> None:
    """Restore transformers' own ``save_pretrained``.

    >>> uninstall_save_hook(); is_save_hook_installed()
    False
    >>> install_save_hook()
    """
    PreTrainedModel.save_pretrained = _ORIGINAL_SAVE


def is_save_hook_installed() -> bool:
    return getattr(PreTrainedModel.save_pretrained, "_hf_sparse_hook", False)
