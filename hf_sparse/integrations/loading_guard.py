"""hf_sparse's model types in transformers (see :mod:`hf_sparse.formats.guard` for what they are and why).

* Reading: :func:`install_config_hook` (``import hf_sparse`` calls it) wraps ``PreTrainedConfig.get_config_dict``, the
  one place every transformers config is read from a folder or the Hub (``AutoConfig``, ``XConfig.from_pretrained``
  and so every ``from_pretrained``), to put the architecture's own ``model_type`` back before the config is built.
  It also registers the hf_sparse model types with ``AutoConfig``, as configs that build the architecture's own
  config, so a config dictionary that reaches ``AutoConfig`` by another path is read the same way.
* Writing: :func:`guarded_save` makes ``config.json`` (written, or uploaded with ``push_to_hub``, by
  ``save_pretrained``) carry hf_sparse's ``model_type`` when the config has an hf_sparse loading marker; the config in
  memory is left as it was.

>>> import hf_sparse  # doctest: +SKIP
>>> AutoModelForCausalLM.from_pretrained("llama-2of4-compact").config.model_type  # doctest: +SKIP
'llama'
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from typing import Any, Iterator

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..formats.guard import GUARDED_TYPES, ORIGINAL_TYPE_KEY, add_guard, guarded_method, strip_guard

_ORIGINAL_GET_CONFIG_DICT = PreTrainedConfig.__dict__["get_config_dict"]
_ORIGINAL_TO_JSON_STRING = PreTrainedConfig.__dict__["to_json_string"]
# Configs being written by guarded_save (by id), per thread.
_SAVING = threading.local()


def _quant_method(config: PreTrainedConfig) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = {"quant_method": getattr(quantization, "quant_method", None)}
    return guarded_method({"quantization_config": quantization})


def _saving() -> set[int]:
    if not hasattr(_SAVING, "ids"):
        _SAVING.ids = set()
    return _SAVING.ids


@contextlib.contextmanager
def guarded_save(config: PreTrainedConfig) -> Iterator[None]:
    """While the block runs, ``config`` serializes with hf_sparse's ``model_type`` if it has an hf_sparse loading
    marker (the config object itself is not changed)."""
    if _quant_method(config) is None:
        yield
        return
    ids = _saving()
    added = id(config) not in ids
    ids.add(id(config))
    try:
        yield
    finally:
        if added:
            ids.discard(id(config))


def _to_json_string(self, use_diff: bool = True) -> str:
    text = _ORIGINAL_TO_JSON_STRING(self, use_diff)
    if id(self) not in _saving():
        return text
    return json.dumps(add_guard(json.loads(text)), indent=2, sort_keys=True) + "\n"


def _get_config_dict(cls, *args, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
    config_dict, unused = _ORIGINAL_GET_CONFIG_DICT.__func__(cls, *args, **kwargs)
    return strip_guard(config_dict), unused


_get_config_dict = functools.wraps(_ORIGINAL_GET_CONFIG_DICT.__func__)(_get_config_dict)
_get_config_dict._hf_sparse_hook = True
_to_json_string = functools.wraps(_ORIGINAL_TO_JSON_STRING)(_to_json_string)
_to_json_string._hf_sparse_hook = True


def _checkpoint_config_class(model_type: str) -> type:
    """The ``AutoConfig`` entry of one hf_sparse model type: building it from a dictionary builds the config of the
    architecture the dictionary names in :data:`ORIGINAL_TYPE_KEY`."""

    class HfSparseCheckpointConfig(PreTrainedConfig):
        __doc__ = (f"``model_type`` {model_type!r}: a checkpoint only hf_sparse loads; reads as the config of its "
                   "architecture.")

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
            config_dict = strip_guard({**config_dict, "model_type": model_type})
            return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict, **kwargs)

    HfSparseCheckpointConfig.model_type = model_type
    HfSparseCheckpointConfig.__name__ = HfSparseCheckpointConfig.__qualname__ = (
        "".join(part.title() for part in model_type.split("_")) + "Config")
    return HfSparseCheckpointConfig


_CONFIG_CLASSES = {model_type: _checkpoint_config_class(model_type) for model_type in set(GUARDED_TYPES.values())}


def install_config_hook() -> None:
    """Make transformers read and write checkpoints with hf_sparse's model types (idempotent; ``import hf_sparse``
    calls it).

    >>> install_config_hook(); is_config_hook_installed()
    True
    """
    PreTrainedConfig.get_config_dict = classmethod(_get_config_dict)
    PreTrainedConfig.to_json_string = _to_json_string
    for model_type, config_class in _CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)


def uninstall_config_hook() -> None:
    """Restore transformers' own ``get_config_dict`` and ``to_json_string`` (the model types stay registered, as
    transformers offers no way to remove one).

    >>> uninstall_config_hook(); is_config_hook_installed()
    False
    >>> install_config_hook()
    """
    PreTrainedConfig.get_config_dict = _ORIGINAL_GET_CONFIG_DICT
    PreTrainedConfig.to_json_string = _ORIGINAL_TO_JSON_STRING


def is_config_hook_installed() -> bool:
    return getattr(PreTrainedConfig.get_config_dict, "_hf_sparse_hook", False)


__all__ = ["ORIGINAL_TYPE_KEY", "guarded_save", "install_config_hook", "is_config_hook_installed",
           "uninstall_config_hook"]
