"""``SparsityConfig``: the one place that knows every pruning option, validates it, and serialises it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..calibration.descriptors import check_descriptor, describe_calibration
from ..calibration.mixes import check_mix
from ..errors import PATH_SHOWN, shown
from ..masks import SparsityPattern
from ..methods import get_method_class
from ..methods.structured import check_per_block_targets
from .profiles import (UNIFORM, check_profile, check_profile_options, profile_name, profile_needs_calibration,
                       require_block_indices)
from ..validation import regex_list, validate_dataclass

QUANT_METHOD = "hf_sparse"

# Fields that exist only at run time: never written to config.json (texts and tokenizers do not belong there).
_RUNTIME_ONLY = ("tokenizer", "target_data")


def registered_method(name: str, value: Any) -> Any:
    """A ``"check"`` (see :mod:`hf_sparse.validation`): ``value`` names a registered method; the error lists them."""
    get_method_class(value)
    return value


def pattern_name(name: str, value: Any) -> Any:
    """A ``"check"``: ``value`` is a sparsity pattern, normalised (``" 2:4"`` -> ``"2:4"``)."""
    return str(SparsityPattern.parse(value))


def _empty_if_none(name: str, value: Any) -> Any:
    return {} if value is None else value


def _torch_device(name: str, value: Any) -> Any:
    if value is not None:
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {shown(value)} is not a valid torch device (e.g. 'cpu', 'cuda:0')") from None
        if device.type == "meta":
            raise ValueError(f"device {shown(value)} holds no data, so nothing can be pruned there; use 'cpu' or a "
                             "GPU such as 'cuda:0'")
    return value


#: what torch.manual_seed accepts
_SEED_RANGE = (-(1 << 63), 1 << 64)


def _seed(name: str, value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _SEED_RANGE[0] <= value < _SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64) (what torch.manual_seed takes), got "
                         f"{shown(value)}")
    return value


def _target_data(name: str, value: Any) -> Any:
    """A ``"check"``: ``None``, a path to an existing file or folder, or a non-empty list of strings."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if not Path(value).expanduser().exists():
            raise ValueError(f"{name} {shown(value, PATH_SHOWN)} is not an existing file or folder; give a path to the "
                             "target text, or a list of strings (raw texts)")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        bad = next((item for item in value if not isinstance(item, str)), None)
        raise ValueError(f"{name} must be a path or a non-empty list of strings; got a list "
                         + (f"holding {shown(bad)} ({type(bad).__name__})" if value else "that is empty"))
    raise ValueError(f"{name} must be a path or a non-empty list of strings, got {shown(value)} "
                     f"({type(value).__name__})")


def _descriptor(name: str, value: Any) -> Any:
    return None if value is None else check_descriptor(value, prefix="calibration.")


@dataclass
class SparsityConfig(QuantizationConfigMixin):
    """What to prune, how, and with which calibration data.

    Pass it to ``from_pretrained(..., sparsity_config=cfg)`` (or ``quantization_config=cfg``) to prune on load, or to
    :func:`hf_sparse.prune` for a model already in memory.

    >>> cfg = SparsityConfig(method="wanda", sparsity=0.5, pattern="2:4", calibration=["some text"] * 4,
    ...                      num_samples=4, sequence_length=8)
    >>> cfg.to_dict()["calibration"]["kind"]
    'texts'
    """

    quant_method: str = field(default=QUANT_METHOD, init=False, repr=False)
    method: str = field(default="wanda", metadata={"help": "Registered method name: see hf_sparse.METHODS.", "check": registered_method})
    sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of weights to remove in each pruned module, in [0, 1). Defaults to 0.5, or to "
                          "1 - N/M for an N:M pattern.", "range": "[0, 1)", "none_is_default": True},
    )
    pattern: str = field(default="unstructured", metadata={
        "help": "'unstructured', 'N:M' such as '2:4', '4:8', or 'structured' (whole heads/channels/blocks removed; "
                "sparsity = fraction of decoder-block parameters).", "check": pattern_name})
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions (re.search) on full module names; only matching linears inside the "
                          "decoder blocks are pruned. Default: every linear of every decoder block.",
                  "check": regex_list},
    )
    exclude: list[str] | None = field(
        default=None, metadata={"help": "Regular expressions on full module names that are never pruned.",
                                 "check": regex_list}
    )
    sparsity_profile: str | dict[str, float] = field(
        default=UNIFORM,
        metadata={"help": "How the target is shared out over the decoder blocks: 'uniform' (every module gets "
                          "`sparsity`), 'owl' (outlier-weighted: blocks with more activation outliers keep more "
                          "weights; overall sparsity stays `sparsity`), or an explicit dict from block index or "
                          "module-name regular expression to sparsity. Unstructured patterns, and pattern="
                          "'structured' with methods that remove heads/channels (flap, pip, disp_llm): there each "
                          "block loses its share of its own parameters, and an explicit dict takes block indices only.",
                  "check": check_profile},
    )
    profile_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Options of the sparsity profile: for 'owl', m (outlier threshold, default 5) and lambda "
                          "(sparsity range S ± lambda, default 0.08).", "check": _empty_if_none},
    )
    calibration: Any = field(
        default=None,
        metadata={"help": "A Hugging Face dataset name, a local .txt/.json/.jsonl file or folder, a list of strings, "
                          "or token ids (a 2-D tensor or list of lists). Required by every method but magnitude."},
    )
    calibration_weights: list[float] | None = field(
        default=None,
        metadata={"help": "A calibration mix: with it, `calibration` is a list of sources (any of the kinds above) "
                          "and source i gives weights[i] / sum(weights) of the windows. Without it a list of "
                          "strings is raw texts, as always."},
    )
    target_data: Any = field(
        default=None, repr=False,
        metadata={"help": "A sample of the text the pruned model will serve (a file, folder or list of strings; run "
                          "time only). Before pruning, the calibration windows are compared with it on the dense "
                          "model, a warning is logged when they differ enough to hurt, and the report is recorded.",
                  "check": _target_data},
    )
    calibration_split: str = field(default="train", metadata={"help": "Dataset split, for dataset names."})
    calibration_column: str = field(default="text", metadata={"help": "Text column, for datasets and JSON."})
    calibration_subset: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    num_samples: int = field(default=128, metadata={"help": "Calibration sequences.", "range": "> 0"})
    sequence_length: int = field(default=2048, metadata={"help": "Tokens per calibration sequence.", "range": "> 0"})
    batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass.", "range": "> 0"})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and any randomness in methods.",
                                           "check": _seed})
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options of the chosen method, e.g. {'block_size': 128}.",
                                        "check": _empty_if_none}
    )
    parallel: bool = field(
        default=False,
        metadata={"help": "Prune blocks concurrently (worker threads on CPU). Only for methods that feed every block "
                          "dense inputs (fista), whose blocks are independent; results equal the sequential run."},
    )
    num_workers: int | None = field(default=None, metadata={"help": "Worker threads for parallel=True.",
                                                                         "range": "> 0"})
    device: str | None = field(
        default=None,
        metadata={"help": "Device each block is pruned on. Default: the first CUDA device if there is one, else "
                          "where the block already is.", "check": _torch_device},
    )
    tokenizer: Any = field(
        default=None, repr=False,
        metadata={"help": "Tokenizer for text calibration (run time only). Default: loaded from the model's id."},
    )
    calibration_descriptor: dict[str, Any] | None = field(
        default=None, repr=False, metadata={"help": "Set when read back from JSON, where the data itself is absent.",
                                      "check": _descriptor}
    )

    def __post_init__(self):
        self.quant_method = QUANT_METHOD
        self.validate()

    def validate(self) -> None:
        """Check every field and the rules between fields; raises ``ValueError`` naming the value and what is allowed.

        Runs on construction and again in :func:`hf_sparse.prune` and prune on load, so a field changed after
        construction (``cfg.sparsity = 1.5``) is refused before anything is pruned. Fields are not checked one by
        one as they are set: transformers' ``from_dict``/``update`` set them in turn (``QuantizationConfigMixin``),
        and a half-updated config (a new pattern before its sparsity) may be inconsistent for a moment.

        >>> cfg = SparsityConfig(method="magnitude"); cfg.sparsity = 1.5
        >>> cfg.validate()
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be in [0, 1), got 1.5
        """
        get_method_class(self.method)  # the method first: its name decides what else is allowed
        parsed = SparsityPattern.parse(self.pattern)
        if self.sparsity is None:
            self.sparsity = parsed.implied_sparsity if parsed.is_n_m else 0.5
        validate_dataclass(self)
        method_cls = get_method_class(self.method)
        if parsed.kind not in method_cls.supports_patterns:
            raise ValueError(
                f"method {shown(self.method)} does not support pattern {shown(self.pattern)}; it supports {method_cls.supports_patterns}"
            )
        if parsed.is_n_m and abs(self.sparsity - parsed.implied_sparsity) > 1e-9:
            raise ValueError(
                f"sparsity {shown(self.sparsity)} contradicts pattern {shown(self.pattern)}, which fixes sparsity at "
                f"{shown(parsed.implied_sparsity)}; omit sparsity or set it to that value"
            )
        if parsed.is_n_m and self.sparsity_profile != UNIFORM:
            raise ValueError(
                f"sparsity_profile={shown(profile_name(self.sparsity_profile))} needs an unstructured pattern, got "
                f"{shown(self.pattern)}: per-block N:M (a different N per block) is not supported; use "
                "pattern='unstructured' with a sparsity, or the uniform profile with N:M"
            )
        if parsed.is_structured and self.sparsity_profile != UNIFORM:
            # A profile gives every block its own share of its parameters: only methods that remove units of a
            # block (not whole blocks) can honour it, and its keys must be blocks, not modules.
            check_per_block_targets(method_cls, f"sparsity_profile={shown(self.sparsity_profile)}")
            require_block_indices(self.sparsity_profile, self.pattern)
        if self.calibration_weights is not None:
            self.calibration_weights = check_mix(self.calibration, self.calibration_weights, self.num_samples)
        self.profile_options = check_profile_options(self.sparsity_profile, self.profile_options)
        if self.parallel and not method_cls.propagate_dense:
            raise ValueError(
                f"parallel=True needs a method whose blocks are independent (dense inputs per block, e.g. 'fista'); "
                f"{shown(self.method)} prunes each block on the outputs of the pruned blocks before it"
            )
        # Validate now, not after a long model load: unknown keys and bad values raise here. The given keys keep
        # their checked values ("False" from a command line is stored as False).
        options = method_cls.options_class.from_dict(self.method, self.method_options)
        self.method_options = {key: getattr(options, key) for key in self.method_options}

    @property
    def parsed_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """True when the method or the sparsity profile (OWL's outlier statistics) reads calibration data."""
        return get_method_class(self.method).needs_calibration or profile_needs_calibration(self.sparsity_profile)

    @property
    def calibration_reader(self) -> str:
        """Who reads the calibration data, for error messages: the method, or the method with its profile when only
        the profile does (``"magnitude with sparsity_profile='owl'"``)."""
        if get_method_class(self.method).needs_calibration:
            return self.method
        return f"{self.method} with sparsity_profile={shown(self.sparsity_profile)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: calibration data is replaced by a descriptor, run-time fields are dropped."""
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for f in dataclasses.fields(self):
            # A mix's weights are in its descriptor (each source's share), with the data they weigh.
            if f.name in _RUNTIME_ONLY or f.name in ("quant_method", "calibration", "calibration_descriptor",
                                                     "calibration_weights"):
                continue
            out[f.name] = getattr(self, f.name)
        out["method_options"] = dict(self.method_options)
        out["calibration"] = describe_calibration(self.calibration, self.calibration_weights) \
            or self.calibration_descriptor
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Inverse of :meth:`to_dict`; also accepts the user-facing form. Unknown keys raise ``ValueError``."""
        values = dict(config_dict)
        values.pop("quant_method", None)
        calibration = values.pop("calibration", None)
        if isinstance(calibration, dict):
            values["calibration_descriptor"] = calibration
            if calibration.get("kind") == "name_or_path":
                values["calibration"] = calibration.get("name")
        else:
            values["calibration"] = calibration
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"unknown SparsityConfig field(s) {unknown}; allowed: {sorted(allowed)}")
        config = cls(**values)
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
        if len(unused) < len(kwargs):
            config.validate()
        return (config, unused) if return_unused_kwargs else config
