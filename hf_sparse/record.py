"""The sparsity record: what was pruned and how, kept in the model's ``config.json`` under ``"sparsity_config"``.

It sits beside ``quantization_config``, not inside it, so that a pruned checkpoint

* loads in plain transformers (an unknown top-level key is kept as a config attribute and ignored),
* is not rejected by serving engines that refuse unknown ``quant_method`` values,
* can be re-loaded with any real quantization config (e.g. 4-bit bitsandbytes for QLoRA recovery).

Shape (``format_version`` 1: one pruning pass)::

    "sparsity_config": {
      "format": "hf_sparse", "format_version": 1,
      "method": "wanda", "pattern": "2:4", "target_sparsity": 0.5,
      "overall_sparsity": 0.5,                    # over all pruned modules, weighted by size
      "modules": {"model.layers.0.mlp.up_proj": 0.5, ...},   # achieved sparsity per pruned module
      "method_options": {...},
      "calibration": {"kind": "file", "name": "calibration.txt", "sha256": "...", "num_samples": 128,
                      "sequence_length": 2048, "seed": 0},     # a local file by base name + hash, a dataset by name
      "evaluation": {"dense_perplexity": 53.1, "pruned_perplexity": 56.4, ...},  # optional, for model cards
      "base_model": "org/name",                    # optional: a Hub id, or a local folder's base name ...
      "base_model_sha256": "...",                  # ... with the hash of that folder's files (or of the GGUF file)
      "recovery": {"method": "lora", "mode": "masked", "rank": 16, "steps": 200, ...},  # optional: after recovery
      "storage": {"format": "hf_sparse_compact", "version": 1, "dense_bytes": ..., "stored_bytes": ...}
                                                   # optional: only in compact checkpoints (hf_sparse.formats)
    }

``format_version`` 2 is written when a model was pruned more than once (say ``include=mlp`` then ``include=attn``):
``modules`` holds every pruned module of every pass, the top-level method/pattern/options/calibration are the last
pass's, and ``"passes"`` lists each pass in order (method, pattern, target sparsity, options, calibration, the
modules it pruned). Version 1 records read as one pass.

A structurally pruned model (``pattern == "structured"``) has ``"structure"``: the original dimensions and, per
remaining block, the head and channel counts kept (validated by :func:`hf_sparse.surgery.structure.validate_structure`);
its ``modules`` is empty (the matrices are smaller, there are no zeros to keep) and ``overall_sparsity`` is the
fraction of decoder-block parameters removed. Pruned with a non-uniform sparsity profile, its ``sparsity_profile``
holds each block's target share (``block_sparsity``) next to the share removed (``block_achieved``). Such records are written as ``format_version`` 2 too, so older readers
refuse them rather than take a smaller model for a dense one.

Masks are the exact zeros of the listed modules' weights: :func:`get_masks` restores them without calibration.
``config.json`` is untrusted input, so :meth:`SparsityRecord.from_dict` validates every field (with
:mod:`hf_sparse.validation`, against the field declarations below) and names the bad one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

from .calibration.descriptors import check_descriptor, sha256_hex
from .calibration.domain import DomainReport
from .config.sparsity import pattern_name, registered_method
from .validation import check_value, to_json_dict, validate_dataclass, validate_mapping
from .engine.devices import readable_weight
from .errors import shown
from .masks import SparsityPattern, is_valid_n_m
from .methods import get_method_class

RECORD_KEY = "sparsity_config"
FORMAT = "hf_sparse"
FORMAT_VERSION = 1  # written for a single pass, so such records stay readable by every hf_sparse
MULTI_PASS_FORMAT_VERSION = 2  # written when "passes" is present: older readers refuse it rather than misread it
READABLE_VERSIONS = (FORMAT_VERSION, MULTI_PASS_FORMAT_VERSION)
_PREFIX = f"{RECORD_KEY}."
_JSON_SCALARS = (str, int, float, bool, type(None))
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------------------------
# Checks of the record's fields that a type cannot express


def _module_sparsities(name: str, value: Any) -> Any:
    # Empty only for a structurally pruned model (checked in SparsityRecord.__post_init__, which sees "structure").
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a non-empty object of module name -> sparsity, got {shown(value)}")
    for module, sparsity in value.items():
        check_value(f"{name}[{shown(module)}]", sparsity, float, {"range": "[0, 1]"})
    return {module: float(sparsity) for module, sparsity in value.items()}


def _structure(name: str, value: Any) -> Any:
    if value is None:
        return None
    from .surgery.structure import validate_structure  # surgery imports the architectures, not the record

    return validate_structure(value)


def _descriptor(name: str, value: Any) -> Any:
    return None if value is None else check_descriptor(value, prefix=f"{name}.")


def _json_value(name: str, value: Any) -> None:
    """A JSON scalar, a list of them or an object of them (what a card may print), finite if a number."""
    if isinstance(value, dict):
        for key, item in value.items():
            _json_value(f"{name}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_value(f"{name}[{index}]", item)
    elif not isinstance(value, _JSON_SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be a JSON string, finite number, boolean or null, got {shown(value)}")


def _json_object(name: str, value: Any) -> Any:
    if value is not None:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object, got {shown(value)} ({type(value).__name__})")
        _json_value(name, value)
    return value


def _block_values(name: str, value: Any, spec: dict) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object of block index -> number, got {shown(value)}")
    for key, item in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"{name} keys must be block indices, got {shown(key)}")
        check_value(f"{name}[{shown(key)}]", item, float, spec)
    return {key: float(item) for key, item in value.items()}


@dataclass
class ProfileEntry:
    """``sparsity_config.sparsity_profile``: what a non-uniform sparsity profile decided."""

    name: str = field(metadata={"help": "'owl' or 'explicit'.", "choices": ("uniform", "owl", "explicit")})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "The profile's options.",
                                                                    "check": _json_object})
    block_sparsity: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Target per block (parameter-weighted over its pruned modules; for structured pruning the share of "
                "the block's parameters to remove).",
        "check": lambda name, value: _block_values(name, value, {"range": "[0, 1]"})})
    block_achieved: dict[str, float] | None = field(default=None, metadata={
        "help": "Structured pruning: the share of each block's parameters actually removed (heads and channels "
                "are whole units, so it differs from the target by less than one unit).",
        "check": lambda name, value: None if value is None else _block_values(name, value, {"range": "[0, 1]"})})
    block_outlier_ratio: dict[str, float] | None = field(default=None, metadata={
        "help": "OWL: each block's share of outlier scores.",
        "check": lambda name, value: None if value is None else _block_values(name, value, {"range": "[0, 1]"})})
    explicit: dict[str, float] | None = field(default=None, metadata={
        "help": "An explicit profile as given (block index or regular expression -> sparsity).",
        "check": lambda name, value: None if value is None else _module_sparsities(name, value)})


def _profile_entry(name: str, value: Any) -> Any:
    if value is None:
        return None
    return to_json_dict(ProfileEntry(**validate_mapping(value, ProfileEntry, f"{name}.")), omit_none=(
        "block_achieved", "block_outlier_ratio", "explicit"))


def _domain_check(name: str, value: Any) -> Any:
    if value is None:
        return None
    checked = validate_mapping(value, DomainReport, f"{name}.")
    if checked.get("target") is not None:
        checked["target"] = check_descriptor(checked["target"], prefix=f"{name}.target.")
    return DomainReport(**checked).to_dict()


def _optional_module_sparsities(name: str, value: Any) -> Any:
    return None if value is None else _module_sparsities(name, value)


@dataclass
class EvaluationEntry:
    """The known ``eval_*`` keys of ``sparsity_config.evaluation`` (what was measured on); every key not starting
    with ``eval_`` is a measured number, ``<stage>_<metric>`` such as ``pruned_perplexity``."""

    eval_data: str | None = field(default=None, metadata={"help": "Base name of the held-out data."})
    eval_sequence_length: int | None = field(default=None, metadata={"help": "Window length.", "range": "> 0"})
    eval_windows: int | None = field(default=None, metadata={"help": "Windows evaluated.", "range": "> 0"})


def _evaluation(name: str, value: Any) -> Any:
    value = {} if value is None else value
    _json_object(name, value)
    validate_mapping({k: v for k, v in value.items() if k.startswith("eval_")}, EvaluationEntry, f"{name}.",
                     allow_unknown=True)
    for key, item in value.items():
        if not key.startswith("eval_"):  # "dense_perplexity", "pruned_accuracy": a measured number
            check_value(f"{name}.{key}", item, float, {})
    return value


@dataclass
class RecoveryEntry:
    """The known keys of ``sparsity_config.recovery`` (a recovery run may add others: JSON values)."""

    method: str | None = field(default=None, metadata={"help": "'lora', ..."})
    mode: str | None = field(default=None, metadata={"help": "'masked' or 'merge'."})
    rank: int | None = field(default=None, metadata={"help": "LoRA rank.", "range": "> 0"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha."})
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps.", "range": "> 0"})
    batch_size: int | None = field(default=None, metadata={"help": "Sequences per step.", "range": "> 0"})
    sequence_length: int | None = field(default=None, metadata={"help": "Tokens per sequence.", "range": "> 0"})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate."})
    objective: str | None = field(default=None, metadata={"help": "'distill', 'lm' or 'distill+lm'."})
    teacher: str | None = field(default=None, metadata={"help": "The teacher: a Hub id or a folder's base name."})
    teacher_sha256: str | None = field(default=None, metadata={"help": "Hash of a local teacher folder's files.",
                                                               "check": sha256_hex})
    teacher_correction: dict[str, Any] | None = field(default=None, metadata={
        "help": "How the teacher was trained before distilling (Minitron's teacher correction): steps, tokens, "
                "held-out perplexity.", "check": _json_object})
    temperature: float | None = field(default=None, metadata={"help": "Distillation temperature.", "range": "> 0"})
    tokens: int | None = field(default=None, metadata={"help": "Training tokens seen.", "range": ">= 0"})
    heldout_perplexity_before: float | None = field(default=None, metadata={
        "help": "Perplexity on the held-out part of the training data before recovery.", "range": "> 0"})
    heldout_perplexity_after: float | None = field(default=None, metadata={
        "help": "The same after recovery.", "range": "> 0"})
    control_perplexity: float | None = field(default=None, metadata={
        "help": "The dense model given the same training, on the same evaluation data (the adaptation control).",
        "range": "> 0"})


def _recovery(name: str, value: Any) -> Any:
    if value is not None:
        _json_object(name, value)
        validate_mapping(value, RecoveryEntry, f"{name}.", allow_unknown=True)
    return value


@dataclass(kw_only=True)
class PruningPass:
    """One pruning pass of a model pruned several times (``sparsity_config.passes`` entries)."""

    method: str = field(metadata={"help": "Registered method name.", "check": registered_method})
    pattern: str = field(metadata={"help": "'unstructured' or 'N:M'.", "check": pattern_name})
    target_sparsity: float = field(metadata={"help": "Requested sparsity.", "range": "[0, 1)"})
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "The method's options.",
                                                                           "check": _json_object})
    calibration: dict[str, Any] | None = field(default=None, metadata={"help": "Calibration descriptor.",
                                                                       "check": _descriptor})
    modules: list[str] = field(metadata={"help": "Modules this pass pruned."})


def _storage(name: str, value: Any) -> Any:
    """The optional ``storage`` entry (:mod:`hf_sparse.formats.compact`): an object naming format and version."""
    if value is not None:
        _json_object(name, value)
        check_value(f"{name}.format", value.get("format"), str, {})
        check_value(f"{name}.version", value.get("version"), int, {})
        for key in ("dense_bytes", "stored_bytes"):
            check_value(f"{name}.{key}", value.get(key), int, {"range": ">= 0"})
        encodings = value.get("encodings", {})
        if not isinstance(encodings, dict) or not all(isinstance(k, str) and len(k) <= 40 and isinstance(n, int)
                                                      and not isinstance(n, bool) and n >= 0
                                                      for k, n in encodings.items()):
            raise ValueError(f"{name}.encodings must be an object of encoding name -> matrix count, got "
                             f"{shown(encodings)}")
        hashes = value.get("sha256")
        if hashes is not None:  # module -> SHA-256 of its compact entries (hf_sparse.formats.integrity)
            if not isinstance(hashes, dict):
                raise ValueError(f"{name}.sha256 must be an object of module name -> SHA-256 hex digest, got "
                                 f"{shown(hashes)}")
            for module, digest in hashes.items():
                if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                    raise ValueError(f"{name}.sha256[{shown(module)}] must be 64 lowercase hex digits, got "
                                     f"{shown(digest)}")
    return value


def _passes(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of pruning passes, got {shown(value)}")
    return [to_json_dict(PruningPass(**validate_mapping(item, PruningPass, f"{name}[{index}]."))) for index, item
            in enumerate(value)]


# ---------------------------------------------------------------------------------------------------------------
# The record


@dataclass(kw_only=True)
class SparsityRecord:
    """The validated content of ``config.sparsity_config``; field order is the key order in ``config.json``."""

    method: str = field(metadata={"help": "Registered method name (the last pass's).", "check": registered_method})
    pattern: str = field(metadata={"help": "'unstructured' or 'N:M' (the last pass's).", "check": pattern_name})
    target_sparsity: float = field(metadata={"help": "Requested sparsity (the last pass's).", "range": "[0, 1)"})
    overall_sparsity: float = field(metadata={"help": "Achieved sparsity over all pruned modules, by size.",
                                              "range": "[0, 1]"})
    modules: dict[str, float] = field(metadata={"help": "Achieved sparsity per pruned module.",
                                                "check": _module_sparsities})
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "The method's options.",
                                                                           "check": _json_object})
    calibration: dict[str, Any] | None = field(default=None, metadata={"help": "Calibration descriptor.",
                                                                       "check": _descriptor})
    evaluation: dict[str, Any] = field(default_factory=dict, metadata={"help": "Measured numbers, for cards.",
                                                                       "check": _evaluation})
    base_model: str | None = field(default=None, metadata={"help": "Hub id, or a local folder's base name."})
    base_model_sha256: str | None = field(default=None, metadata={"help": "Hash of a local base model's files.",
                                                                  "check": sha256_hex})
    recovery: dict[str, Any] | None = field(default=None, metadata={"help": "What recovery did.",
                                                                    "check": _recovery})
    passes: list[dict[str, Any]] | None = field(default=None, metadata={"help": "Every pass, for a model pruned "
                                                                                "more than once.", "check": _passes})
    storage: dict[str, Any] | None = field(default=None, metadata={"help": "How a compact checkpoint stores the "
                                                                          "weights; absent = dense.",
                                                                  "check": _storage})
    structure: dict[str, Any] | None = field(default=None, metadata={
        "help": "Shapes after structured pruning: original dimensions, kept heads/channels per block, removed blocks "
                "(hf_sparse.surgery.structure).", "check": _structure})

    sparsity_profile: dict[str, Any] | None = field(
        default=None, metadata={"help": "The sparsity profile of the last pass when not uniform: name, options, "
                                        "target per block (and OWL's outlier ratio per block).",
                                "check": _profile_entry})
    domain_check: dict[str, Any] | None = field(
        default=None, metadata={"help": "Calibration vs. target data on the dense model (SparsityConfig.target_data).",
                                "check": _domain_check})
    target_modules: dict[str, float] | None = field(
        default=None, metadata={"help": "Target sparsity per module of the last pass, when not uniform (`modules` "
                                        "holds the achieved ones).", "check": _optional_module_sparsities})

    # Optional keys are written only when set, so records of plain pruning keep their exact shape.
    _OMIT_WHEN_NONE = ("base_model", "base_model_sha256", "recovery", "passes", "storage", "structure",
                       "sparsity_profile", "domain_check", "target_modules")

    def __post_init__(self):
        validate_dataclass(self, prefix=_PREFIX)
        if not self.modules and self.structure is None:
            raise ValueError(f"{_PREFIX}modules must be a non-empty object of module name -> sparsity, got {{}}")

    @property
    def format_version(self) -> int:
        return MULTI_PASS_FORMAT_VERSION if self.passes or self.structure is not None else FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": self.format_version,
                **to_json_dict(self, omit_none=self._OMIT_WHEN_NONE)}

    @classmethod
    def from_dict(cls, data: Any) -> SparsityRecord:
        """Validate a record read from ``config.json``; raises ``ValueError`` naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{RECORD_KEY} in config.json must be an object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{RECORD_KEY}.format must be {shown(FORMAT)}, got {shown(data.get('format'))}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ValueError(
                f"{RECORD_KEY}.format_version {shown(version)} is not supported by this hf_sparse (reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        values = {key: value for key, value in data.items() if key not in ("format", "format_version")}
        # Fields a version-1 record may hold as null where this version writes an empty object.
        for key in ("method_options", "evaluation"):
            if values.get(key) is None:
                values.pop(key, None)
        record = cls(**validate_mapping(values, cls, _PREFIX))
        if (version == MULTI_PASS_FORMAT_VERSION) != bool(record.passes or record.structure is not None):
            raise ValueError(f"{RECORD_KEY}.passes or structure must be present exactly when format_version is "
                             f"{MULTI_PASS_FORMAT_VERSION}, got format_version {shown(version)}")
        options_class = get_method_class(record.method).options_class
        try:
            options_class.from_dict(record.method, record.method_options)
        except ValueError as error:
            raise ValueError(f"{RECORD_KEY}.method_options: {error}") from None
        return record

    def pattern_of(self, module: str) -> SparsityPattern:
        """The pattern ``module`` was last pruned with."""
        for entry in reversed(self.passes or []):
            if module in entry["modules"]:
                return SparsityPattern.parse(entry["pattern"])
        return SparsityPattern.parse(self.pattern)

    def as_pass(self) -> dict[str, Any]:
        """This record's single pass, as a ``passes`` entry."""
        return to_json_dict(PruningPass(method=self.method, pattern=self.pattern,
                                        target_sparsity=self.target_sparsity, method_options=self.method_options,
                                        calibration=self.calibration, modules=list(self.modules)))


def merge_records(previous: SparsityRecord, new: SparsityRecord) -> SparsityRecord:
    """The record of a model pruned by ``previous`` and then by ``new``: every module of both, both passes listed.

    ``new``'s values win for modules pruned twice; ``previous``'s evaluation is dropped (it measured the model before
    this pass) while its base model and recovery are kept, and so is its domain check unless ``new`` made one. ``overall_sparsity`` is left to the caller, who can
    measure it on the weights.
    """
    passes = list(previous.passes or [previous.as_pass()]) + [new.as_pass()]
    # A version-1 record may name its base model by an absolute local path: never write that out again.
    keep_base = previous.base_model is not None and not PurePath(previous.base_model).is_absolute()
    return SparsityRecord(
        method=new.method, pattern=new.pattern, target_sparsity=new.target_sparsity,
        overall_sparsity=new.overall_sparsity, modules={**previous.modules, **new.modules},
        method_options=new.method_options, calibration=new.calibration,
        base_model=previous.base_model if keep_base else new.base_model,
        base_model_sha256=previous.base_model_sha256 if keep_base else new.base_model_sha256,
        recovery=previous.recovery, passes=passes, structure=previous.structure,
        sparsity_profile=new.sparsity_profile, target_modules=new.target_modules,
        # the last domain check made (calibration vs. target text): the new pass's, else the earlier one's
        domain_check=new.domain_check if new.domain_check is not None else previous.domain_check,
    )


def write_record(model: nn.Module, record: SparsityRecord) -> None:
    """Store ``record`` on ``model.config`` so ``save_pretrained``/``push_to_hub`` write it to ``config.json``."""
    setattr(model.config, RECORD_KEY, record.to_dict())


def read_record(model_or_config: Any) -> SparsityRecord | None:
    """The validated sparsity record of a model or config, or ``None`` if it was never pruned."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, RECORD_KEY, None)
    if data is None:
        return None
    if hasattr(data, "to_dict") and not isinstance(data, dict):
        data = data.to_dict()
    return SparsityRecord.from_dict(data)


def overall_sparsity(model: nn.Module, module_names) -> float:
    """Fraction of zeros over the weights of ``module_names`` together."""
    zeros = total = 0
    modules = dict(model.named_modules())
    for name in module_names:
        weight = modules[name].weight
        zeros += (weight == 0).sum().item()
        total += weight.numel()
    return zeros / total if total else 0.0


def get_masks(model: nn.Module, strict: bool = True) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` = kept) of every module in the model's sparsity record, read from its exact zeros.

    No calibration is run: a pruned checkpoint carries its masks as the zeros of its weights. A structurally pruned
    model lists no modules (its matrices are smaller, every remaining weight is free): the result is empty. With ``strict``,
    a module whose zero count no longer matches the record (weights changed by dense training), or whose zeros do
    not follow the N:M pattern the record claims for it, raises.

    >>> masks = hf_sparse.get_masks(AutoModelForCausalLM.from_pretrained("pruned-dir"))  # doctest: +SKIP
    """
    record = read_record(model)
    if record is None:
        raise ValueError(
            f"this model has no {shown(RECORD_KEY)} in its config: it was not pruned by hf_sparse (or the record was removed)"
        )
    modules = dict(model.named_modules())
    masks = {}
    for name, expected in record.modules.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"{RECORD_KEY} names module {shown(name)}, which this model does not have")
        with readable_weight(module, torch.device("cpu")) as weight:  # offloaded weights are read from their store
            mask = weight.detach() != 0
        achieved = 1.0 - mask.sum().item() / mask.numel()
        # The record keeps 6 significant digits at most after JSON round trips; compare with a tolerance of one weight.
        if strict and not math.isclose(achieved, expected, abs_tol=1.0 / mask.numel() + 1e-9):
            raise ValueError(
                f"module {shown(name)} has sparsity {achieved:.6f} but the record says {expected:.6f}: its weights were "
                "changed after pruning (dense fine-tuning?); use hf_sparse.peft or the mask-keeping callback"
            )
        pattern = record.pattern_of(name)
        if strict and pattern.is_n_m and not is_valid_n_m(mask, pattern.n, pattern.m):
            raise ValueError(
                f"module {shown(name)} does not follow the pattern {shown(str(pattern))} its record claims (more than "
                f"{pattern.n} non-zeros in some group of {pattern.m} inputs): the record does not describe these "
                "weights"
            )
        masks[name] = mask
    return masks


def merge_evaluation(model: nn.Module, evaluation: dict[str, Any] | None) -> SparsityRecord:
    """Add ``evaluation`` (e.g. ``{"pruned_perplexity": 62.1, "eval_data": "test.txt"}``) to the model's record,
    newer values winning, and store the record back on ``model.config``; returns the record.

    >>> merge_evaluation(model, {"pruned_perplexity": 62.1}).evaluation  # doctest: +SKIP
    {'dense_perplexity': 53.06, 'pruned_perplexity': 62.1}
    """
    record = read_record(model)
    if record is None:
        raise ValueError(f"the model has no {shown(RECORD_KEY)} record: prune it with hf_sparse first")
    if evaluation:
        record.evaluation = {**record.evaluation, **evaluation}
        write_record(model, record)
    return record
