"""``SparsityConfig``: the one place that knows every pruning option, validates it, and serialises it."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .masks import SparsityPattern
from .methods import get_method_class

QUANT_METHOD = "hf_sparse"

# Fields that exist only at run time: never written to config.json (texts and tokenizers do not belong there).
_RUNTIME_ONLY = ("tokenizer",)


def describe_calibration(source: Any) -> dict[str, Any] | None:
    """A small JSON descriptor of a calibration source: its kind, a name where it has one, and a content hash."""
    if source is None:
        return None
    if isinstance(source, str):
        return {"kind": "name_or_path", "name": source}
    digest = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        digest.update(source.detach().cpu().to(torch.int64).numpy().tobytes())
        return {"kind": "token_ids", "count": int(source.shape[0]), "sha256": digest.hexdigest()}
    items = list(source)
    if all(isinstance(item, str) for item in items):
        for item in items:
            digest.update(item.encode("utf-8") + b"\x00")
        return {"kind": "texts", "count": len(items), "sha256": digest.hexdigest()}
    for item in items:
        digest.update(torch.as_tensor(item, dtype=torch.int64).numpy().tobytes() + b"\x00")
    return {"kind": "token_ids", "count": len(items), "sha256": digest.hexdigest()}


def _check_regex_list(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of regular expressions on module names, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {error}") from None
    return list(value)


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
    method: str = field(default="wanda", metadata={"help": "Registered method name: see hf_sparse.METHODS."})
    sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of weights to remove in each pruned module, in [0, 1). Defaults to 0.5, or to "
                          "1 - N/M for an N:M pattern."},
    )
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured', 'N:M' such as '2:4', '4:8', or "
                                                                  "'structured' (whole heads/channels/blocks removed; "
                                                                  "sparsity = fraction of decoder-block parameters)."})
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions (re.search) on full module names; only matching linears inside the "
                          "decoder blocks are pruned. Default: every linear of every decoder block."},
    )
    exclude: list[str] | None = field(
        default=None, metadata={"help": "Regular expressions on full module names that are never pruned."}
    )
    calibration: Any = field(
        default=None,
        metadata={"help": "A Hugging Face dataset name, a local .txt/.json/.jsonl file or folder, a list of strings, "
                          "or token ids (a 2-D tensor or list of lists). Required by every method but magnitude."},
    )
    calibration_split: str = field(default="train", metadata={"help": "Dataset split, for dataset names."})
    calibration_column: str = field(default="text", metadata={"help": "Text column, for datasets and JSON."})
    calibration_subset: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    num_samples: int = field(default=128, metadata={"help": "Calibration sequences."})
    sequence_length: int = field(default=2048, metadata={"help": "Tokens per calibration sequence."})
    batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and any randomness in methods."})
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options of the chosen method, e.g. {'block_size': 128}."}
    )
    parallel: bool = field(
        default=False,
        metadata={"help": "Prune blocks concurrently (worker threads on CPU). Only for methods that feed every block "
                          "dense inputs (fista), whose blocks are independent; results equal the sequential run."},
    )
    num_workers: int | None = field(default=None, metadata={"help": "Worker threads for parallel=True."})
    device: str | None = field(
        default=None,
        metadata={"help": "Device each block is pruned on. Default: the first CUDA device if there is one, else "
                          "where the block already is."},
    )
    tokenizer: Any = field(
        default=None, repr=False,
        metadata={"help": "Tokenizer for text calibration (run time only). Default: loaded from the model's id."},
    )
    calibration_descriptor: dict[str, Any] | None = field(
        default=None, repr=False, metadata={"help": "Set when read back from JSON, where the data itself is absent."}
    )

    def __post_init__(self):
        self.quant_method = QUANT_METHOD
        method_cls = get_method_class(self.method)
        parsed = SparsityPattern.parse(self.pattern)
        if parsed.kind not in method_cls.supports_patterns:
            raise ValueError(
                f"method {self.method!r} does not support pattern {self.pattern!r}; it supports {method_cls.supports_patterns}"
            )
        self.pattern = str(parsed)
        if self.sparsity is None:
            self.sparsity = parsed.implied_sparsity if parsed.is_n_m else 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if parsed.is_n_m and abs(self.sparsity - parsed.implied_sparsity) > 1e-9:
            raise ValueError(
                f"sparsity {self.sparsity!r} contradicts pattern {self.pattern!r}, which fixes sparsity at "
                f"{parsed.implied_sparsity!r}; omit sparsity or set it to that value"
            )
        self.include = _check_regex_list("include", self.include)
        self.exclude = _check_regex_list("exclude", self.exclude)
        for name in ("num_samples", "sequence_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"parallel must be True or False, got {self.parallel!r}")
        if self.parallel and not method_cls.propagate_dense:
            raise ValueError(
                f"parallel=True needs a method whose blocks are independent (dense inputs per block, e.g. 'fista'); "
                f"{self.method!r} prunes each block on the outputs of the pruned blocks before it"
            )
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 1):
            raise ValueError(f"num_workers must be a positive integer or None, got {self.num_workers!r}")
        if self.method_options is None:
            self.method_options = {}
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a dict, got {self.method_options!r}")
        # Validate now, not after a long model load: unknown keys and bad values raise here.
        method_cls.options_class.from_dict(self.method, self.method_options)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {self.device!r} is not a valid torch device (e.g. 'cpu', 'cuda:0')") from None

    @property
    def parsed_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        return bool(get_method_class(self.method).statistics)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: calibration data is replaced by a descriptor, run-time fields are dropped."""
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for f in dataclasses.fields(self):
            if f.name in _RUNTIME_ONLY or f.name in ("quant_method", "calibration", "calibration_descriptor"):
                continue
            out[f.name] = getattr(self, f.name)
        out["method_options"] = dict(self.method_options)
        out["calibration"] = describe_calibration(self.calibration) or self.calibration_descriptor
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
        return (config, unused) if return_unused_kwargs else config
