"""GGUF checkpoints: prune them on load, and save the result as an ordinary safetensors checkpoint.

transformers reads a ``.gguf`` file through a quantizer of its own (``GgufHfQuantizer``), which is why

* ``from_pretrained(folder, gguf_file=F, sparsity_config=cfg)`` cannot hand ``cfg`` on as a ``quantization_config``
  (transformers refuses "to combine Quantization and loading a model from a GGUF file"), and
* a GGUF-loaded model refuses ``save_pretrained`` ("The model is quantized with gguf and is not serializable").

Here the file is loaded *dequantized* (``GgufConfig(dequantize=True)``: pruning needs dense weights), pruned with
:func:`hf_sparse.prune`, and the GGUF quantizer's state is removed, leaving a plain dense model with zeros in it.
The record names the GGUF file by its file name and sha256, never by a local path.

    >>> model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ...                                              dtype=torch.float32, sparsity_config=cfg)  # doctest: +SKIP
    >>> model.save_pretrained("smollm2-2of4")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import QUANT_METHOD, SparsityConfig
from ..errors import shown

logger = logging.getLogger(__name__)

GGUF_QUANT_METHOD = "gguf"
# A dequantized GGUF load leaves no trace of the file (transformers drops its quantizer), so the prune-on-load path
# notes the source on the model under this attribute until pruning has recorded it.
_SOURCE_ATTRIBUTE = "_hf_sparse_gguf_source"
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file a model was loaded from: ``gguf_file`` as given to ``from_pretrained`` (relative to
    ``name_or_path``, or a path of its own) and, when it can be found on disk, the local ``path``."""

    name_or_path: str
    gguf_file: str
    path: Path | None

    @property
    def name(self) -> str:
        """The file name alone: what a record or model card may show (a local path must not be published)."""
        return Path(self.gguf_file).name

    def sha256(self) -> str | None:
        """Hex sha256 of the file's bytes, or ``None`` if the file is not on this machine."""
        return None if self.path is None else file_sha256(self.path)

    def load_tokenizer(self):
        """The tokenizer stored in the GGUF file (``AutoTokenizer.from_pretrained(..., gguf_file=...)``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.name_or_path, gguf_file=self.gguf_file)


def _quant_method(quantization_config: Any) -> str | None:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return getattr(method, "value", method)  # transformers' enum -> its string


def _resolve(name_or_path: str, gguf_file: str) -> Path | None:
    for candidate in (Path(gguf_file).expanduser(), Path(name_or_path).expanduser() / gguf_file):
        if candidate.is_file():
            return candidate
    from transformers.utils import cached_file  # a Hub id: the file was downloaded to the cache by the load

    try:
        found = cached_file(name_or_path, gguf_file, local_files_only=True, _raise_exceptions_for_missing_entries=False)
    except OSError:
        found = None
    return Path(found) if found else None


def gguf_source(model: nn.Module) -> GgufSource | None:
    """The GGUF file ``model`` was loaded from (``from_pretrained(..., gguf_file=...)``), or ``None``.

    Known when transformers' GGUF quantizer is still attached (the default load) or when the model came through
    :func:`from_pretrained_gguf`; a model the caller loaded with ``GgufConfig(dequantize=True)`` carries no trace of
    the file and counts as an ordinary model.
    """
    noted = getattr(model, _SOURCE_ATTRIBUTE, None)
    if noted is not None:
        return noted
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None or _quant_method(config) != GGUF_QUANT_METHOD or not getattr(config, "gguf_file", None):
        return None
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    return GgufSource(name_or_path, str(config.gguf_file), _resolve(name_or_path, str(config.gguf_file)))


def check_gguf_weights_dense(model: nn.Module) -> None:
    """Raise if ``model`` keeps weights packed in GGUF blocks (``GgufLinear``), which pruning cannot edit."""
    packed = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None) or {}
    if packed:
        first = next(iter(packed))
        raise ValueError(
            f"this GGUF-loaded model keeps {len(packed)} weights packed in GGUF blocks (e.g. {shown(first)}); pruning needs "
            "dense weights: load it with quantization_config=transformers.GgufConfig(dequantize=True), or let "
            "from_pretrained(..., gguf_file=..., sparsity_config=...) do the load"
        )


def detach_gguf(model: nn.Module) -> None:
    """Turn a dequantized GGUF-loaded model into a plain one that ``save_pretrained`` writes as safetensors.

    The weights are already ordinary tensors; what blocks saving is the GGUF quantizer transformers leaves attached
    (``model.hf_quantizer``, ``config.quantization_config``, ...). It is removed as for hf_sparse's own quantizer.
    """
    check_gguf_weights_dense(model)
    # Imported here: hf_sparse.integrations.transformers imports hf_sparse.api, which imports this module.
    from .transformers import remove_quantization_state

    remove_quantization_state(model)  # a structured prune puts its loading marker back afterwards (api.prune)
    if _SOURCE_ATTRIBUTE in vars(model):
        delattr(model, _SOURCE_ATTRIBUTE)


def _pop_sparsity_config(kwargs: dict[str, Any]) -> SparsityConfig | None:
    """The pruning config in ``from_pretrained`` keywords, as ``sparsity_config=`` or an hf_sparse
    ``quantization_config=``; removed from ``kwargs``."""
    from .transformers import SPARSITY_KWARG, _as_sparsity_config

    value = kwargs.pop(SPARSITY_KWARG, None)
    quantization_config = kwargs.get("quantization_config")
    if quantization_config is not None and _quant_method(quantization_config) == QUANT_METHOD:
        if value is not None and value is not quantization_config:
            raise ValueError("from_pretrained got both sparsity_config and an hf_sparse quantization_config; pass one")
        value = kwargs.pop("quantization_config")
    return None if value is None else _as_sparsity_config(value)


def _dequantizing_config(quantization_config: Any):
    """The ``quantization_config`` for a GGUF load whose weights are to be pruned: ``GgufConfig(dequantize=True)``."""
    from transformers import GgufConfig

    if quantization_config is None:
        return GgufConfig(dequantize=True)
    if _quant_method(quantization_config) != GGUF_QUANT_METHOD:
        raise ValueError(
            f"a GGUF file cannot be loaded with quantization_config quant_method="
            f"{shown(_quant_method(quantization_config))}; prune it, save it, then re-load the saved folder to quantize it"
        )
    if not getattr(quantization_config, "dequantize", False):
        raise ValueError("pruning a GGUF file needs its weights dense: pass GgufConfig(dequantize=True), or no "
                         "quantization_config at all")
    return quantization_config


def from_pretrained_gguf(load: Callable[..., nn.Module], pretrained_model_name_or_path: str | os.PathLike,
                         *model_args, **kwargs) -> nn.Module:
    """``load(pretrained_model_name_or_path, gguf_file=..., ...)``, pruned as the keywords' sparsity config says.

    ``load`` is the original ``from_pretrained`` (bound to its class). Without a sparsity config this is exactly
    that call. With one, the file is loaded dequantized, checked and pruned by :func:`hf_sparse.prune` (which also
    detaches the GGUF quantizer and records the file's name and sha256).
    """
    config = _pop_sparsity_config(kwargs)
    if config is None:
        return load(pretrained_model_name_or_path, *model_args, **kwargs)
    from .transformers import HfSparseQuantizer, prune_loaded

    # The checks prune-on-load runs before reading weights (device, calibration present, paths exist).
    HfSparseQuantizer(config, pre_quantized=False).validate_environment()
    kwargs["quantization_config"] = _dequantizing_config(kwargs.get("quantization_config"))
    model = load(pretrained_model_name_or_path, *model_args, **kwargs)
    name_or_path, gguf_file = str(pretrained_model_name_or_path), str(kwargs["gguf_file"])
    setattr(model, _SOURCE_ATTRIBUTE, GgufSource(name_or_path, gguf_file, _resolve(name_or_path, gguf_file)))
    prune_loaded(model, config, tokenizer=config.tokenizer)
    return model
