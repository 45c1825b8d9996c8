"""The loading guard in transformers (see :mod:`hf_sparse.formats.guard` for what it is and why).

* Reading: :func:`install_config_hook` (``import hf_sparse`` calls it) wraps ``PreTrainedConfig.get_config_dict``, the
  one place every transformers config is read from a folder or the Hub (``AutoConfig``, ``XConfig.from_pretrained``
  and so every ``from_pretrained``), to drop the guard entry before the config is built.
* Writing: :func:`guarded_save` puts the entry on a model's config while ``save_pretrained`` writes ``config.json``
  (and uploads it, with ``push_to_hub``), when the config carries an hf_sparse loading marker; the config in memory
  is left as it was.

>>> import hf_sparse  # doctest: +SKIP
>>> AutoModelForCausalLM.from_pretrained("llama-2of4-compact")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from transformers import PreTrainedConfig

from ..formats.guard import LABELS_KEY, guard_entries, guarded_method, strip_guard

_ORIGINAL_GET_CONFIG_DICT = PreTrainedConfig.__dict__["get_config_dict"]


def _quant_method(config: PreTrainedConfig) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = {"quant_method": getattr(quantization, "quant_method", None)}
    return guarded_method({"quantization_config": quantization})


@contextlib.contextmanager
def guarded_save(config: PreTrainedConfig) -> Iterator[None]:
    """While the block runs, ``config.id2label`` holds the guard entry if ``config`` has an hf_sparse loading marker."""
    method = _quant_method(config)
    if method is None:
        yield
        return
    original = getattr(config, LABELS_KEY, None)
    setattr(config, LABELS_KEY, guard_entries(method, original))
    try:
        yield
    finally:
        setattr(config, LABELS_KEY, original)


def _get_config_dict(cls, *args, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
    config_dict, unused = _ORIGINAL_GET_CONFIG_DICT.__func__(cls, *args, **kwargs)
    return strip_guard(config_dict), unused


_get_config_dict = functools.wraps(_ORIGINAL_GET_CONFIG_DICT.__func__)(_get_config_dict)
_get_config_dict._hf_sparse_hook = True


def install_config_hook() -> None:
    """Make transformers read guarded ``config.json`` files (idempotent; ``import hf_sparse`` calls it).

    >>> install_config_hook(); is_config_hook_installed()
    True
    """
    PreTrainedConfig.get_config_dict = classmethod(_get_config_dict)


def uninstall_config_hook() -> None:
    """Restore transformers' own ``get_config_dict``: guarded checkpoints fail again, naming hf_sparse.

    >>> uninstall_config_hook(); is_config_hook_installed()
    False
    >>> install_config_hook()
    """
    PreTrainedConfig.get_config_dict = _ORIGINAL_GET_CONFIG_DICT


def is_config_hook_installed() -> bool:
    return getattr(PreTrainedConfig.get_config_dict, "_hf_sparse_hook", False)
