"""The sparsity record: what was pruned and how, kept in the model's ``config.json`` under ``"sparsity_config"``.

It sits beside ``quantization_config``, not inside it, so that a pruned checkpoint

* loads in plain transformers (an unknown top-level key is kept as a config attribute and ignored),
* is not rejected by serving engines that refuse unknown ``quant_method`` values,
* can be re-loaded with any real quantization config (e.g. 4-bit bitsandbytes for QLoRA recovery).

Shape (``format_version`` 1)::

    "sparsity_config": {
      "format": "hf_sparse", "format_version": 1,
      "method": "wanda", "pattern": "2:4", "target_sparsity": 0.5,
      "overall_sparsity": 0.5,                    # over all pruned modules, weighted by size
      "modules": {"model.layers.0.mlp.up_proj": 0.5, ...},   # achieved sparsity per pruned module
      "method_options": {...},
      "calibration": {"kind": "name_or_path", "name": "...", "num_samples": 128, "sequence_length": 2048, "seed": 0},
      "evaluation": {"dense_perplexity": 53.1, "pruned_perplexity": 56.4, ...},  # optional, for model cards
      "base_model": "org/name",                    # optional: what was pruned (model cards)
      "recovery": {"method": "lora", "mode": "masked", "rank": 16, "steps": 200, ...}   # optional: after recovery
    }

Structured pruning (``pattern == "structured"``, ``format_version`` 2) adds ``"structure"``: the original dimensions
and, per remaining block, the head and channel counts kept (see :mod:`hf_sparse.surgery.structure`, which validates
it); ``modules`` is then empty (no masks: the matrices are smaller) and ``overall_sparsity`` is the fraction of
decoder-block parameters removed. Records of ``format_version`` 1 are still read.

Masks are the exact zeros of the listed modules' weights: :func:`get_masks` restores them without calibration.
``config.json`` is untrusted input, so :meth:`SparsityRecord.from_dict` validates every field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .masks import SparsityPattern
from .methods import get_method_class

RECORD_KEY = "sparsity_config"
FORMAT = "hf_sparse"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added the optional "structure" entry


@dataclass
class SparsityRecord:
    """The validated content of ``config.sparsity_config``."""

    method: str
    pattern: str
    target_sparsity: float
    modules: dict[str, float]
    method_options: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    overall_sparsity: float | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    recovery: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None  # shapes after structured pruning (hf_sparse.surgery.structure)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "pattern": self.pattern,
            "target_sparsity": self.target_sparsity,
            "overall_sparsity": self.overall_sparsity,
            "modules": dict(self.modules),
            "method_options": dict(self.method_options),
            "calibration": self.calibration,
            "evaluation": dict(self.evaluation),
            # Optional keys are written only when set, so records of plain pruning keep their exact shape.
            **({"base_model": self.base_model} if self.base_model is not None else {}),
            **({"recovery": dict(self.recovery)} if self.recovery is not None else {}),
            **({"structure": self.structure} if self.structure is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> SparsityRecord:
        """Validate a record read from ``config.json``; raises ``ValueError`` naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{RECORD_KEY} in config.json must be an object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{RECORD_KEY}.format must be {FORMAT!r}, got {data.get('format')!r}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{RECORD_KEY}.format_version {version!r} is not supported by this hf_sparse (reads "
                f"{list(READABLE_VERSIONS)})"
            )
        structure = data.get("structure")
        if structure is not None:
            from .surgery.structure import validate_structure

            structure = validate_structure(structure)
        get_method_class(data.get("method"))  # raises with the registered names
        pattern = str(SparsityPattern.parse(data.get("pattern")))
        target = data.get("target_sparsity")
        if not isinstance(target, (int, float)) or not 0 <= target < 1:
            raise ValueError(f"{RECORD_KEY}.target_sparsity must be a number in [0, 1), got {target!r}")
        modules = data.get("modules")
        if not isinstance(modules, dict) or (not modules and structure is None):
            raise ValueError(f"{RECORD_KEY}.modules must be a non-empty object of module name -> sparsity")
        for name, value in modules.items():
            if not isinstance(name, str) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{RECORD_KEY}.modules entry {name!r}: {value!r} is not a sparsity in [0, 1]")
        options = data.get("method_options") or {}
        calibration = data.get("calibration")
        evaluation = data.get("evaluation") or {}
        if not isinstance(options, dict) or not (calibration is None or isinstance(calibration, dict)) \
                or not isinstance(evaluation, dict):
            raise ValueError(f"{RECORD_KEY}: method_options, calibration and evaluation must be objects")
        base_model, recovery = data.get("base_model"), data.get("recovery")
        if not (base_model is None or isinstance(base_model, str)) or not (recovery is None or isinstance(recovery, dict)):
            raise ValueError(f"{RECORD_KEY}: base_model must be a string and recovery an object, got {base_model!r}, "
                             f"{recovery!r}")
        return cls(
            method=data["method"], pattern=pattern, target_sparsity=float(target),
            modules={k: float(v) for k, v in modules.items()}, method_options=options, calibration=calibration,
            overall_sparsity=data.get("overall_sparsity"), evaluation=evaluation, base_model=base_model,
            recovery=recovery, structure=structure,
        )


def _configs(model: nn.Module) -> list:
    """The model's config plus its text sub-config, if different (multimodal wrappers)."""
    config = model.config
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    return configs


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
    model has none (its matrices are smaller): the result is empty. With ``strict``,
    a module whose zero count no longer matches the record (weights changed by dense training) raises.

    >>> masks = hf_sparse.get_masks(AutoModelForCausalLM.from_pretrained("pruned-dir"))  # doctest: +SKIP
    """
    record = read_record(model)
    if record is None:
        raise ValueError(
            f"this model has no {RECORD_KEY!r} in its config: it was not pruned by hf_sparse (or the record was removed)"
        )
    if record.structure is not None:
        # Structured pruning made the matrices smaller instead of zeroing weights: every remaining weight is free,
        # so there is nothing to keep (LoRA recovery and fine-tuning need no masks). The shapes are in "structure".
        return {}
    modules = dict(model.named_modules())
    masks = {}
    for name, expected in record.modules.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"{RECORD_KEY} names module {name!r}, which this model does not have")
        mask = module.weight.detach() != 0
        achieved = 1.0 - mask.sum().item() / mask.numel()
        # The record keeps 6 significant digits at most after JSON round trips; compare with a tolerance of one weight.
        if strict and not math.isclose(achieved, expected, abs_tol=1.0 / mask.numel() + 1e-9):
            raise ValueError(
                f"module {name!r} has sparsity {achieved:.6f} but the record says {expected:.6f}: its weights were "
                "changed after pruning (dense fine-tuning?); use hf_sparse.peft or the mask-keeping callback"
            )
        masks[name] = mask
    return masks
