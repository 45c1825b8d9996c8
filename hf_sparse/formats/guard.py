"""The loading guard: checkpoints only hf_sparse can load make plain transformers fail *naming hf_sparse*.

Two kinds of checkpoint need hf_sparse to load: compact storage (``quantization_config.quant_method ==
"hf_sparse_compact"``: the stored values are not the layers' shapes) and structured checkpoints whose blocks differ in
shape (``"hf_sparse_structured"``). transformers 5 does not raise on a ``quant_method`` it does not know: it logs
"Unknown quantization type ... we will skip the quantization", builds the dense model and then stops on a size
mismatch that says nothing about hf_sparse (and with ``ignore_mismatched_sizes=True`` it would re-initialise those
weights at random).

So the ``config.json`` of such a checkpoint carries one more entry, in ``id2label``: a label whose *key* is the
explanation (:data:`GUARD_PREFIX` ...). Every transformers config converts the keys of ``id2label`` to integers while
it is built (``PreTrainedConfig.__post_init__``), before any weight is read, whatever keyword arguments
``from_pretrained`` got; without hf_sparse that fails with::

    ValueError: invalid literal for int() with base 10: "This checkpoint needs hf_sparse to load (compact storage,
    hf_sparse_compact): pip install hf-sparse and import hf_sparse, or write a dense copy with `hf-sparse decompress
    IN OUT`"

With ``import hf_sparse``, :func:`hf_sparse.integrations.loading_guard.install_config_hook` removes the entry from the
config dictionary before the config is built (:func:`strip_guard`), and ``save_pretrained`` writes it back when the
model still carries a marker (:func:`guard_entries`). A causal LM does not use ``id2label``; the labels it had are kept.

>>> config = {"quantization_config": {"quant_method": "hf_sparse_compact"}}
>>> guarded = add_guard(config)
>>> next(iter(guarded["id2label"])).startswith(GUARD_PREFIX), strip_guard(guarded) == config
(True, True)
"""

from __future__ import annotations

from typing import Any

from ..surgery import STRUCTURED_QUANT_METHOD
from .compact import STORAGE_FORMAT

LABELS_KEY = "id2label"
GUARD_PREFIX = "This checkpoint needs hf_sparse to load"
GUARD_LABEL = "hf_sparse"

# Python shows at most 200 characters of the value in the int() error: each text stays within MAX_MESSAGE.
MAX_MESSAGE = 190
_WHY = {
    STORAGE_FORMAT: (f"compact storage, {STORAGE_FORMAT}): pip install hf-sparse and import hf_sparse, or write a dense "
                     "copy with `hf-sparse decompress IN OUT`"),
    STRUCTURED_QUANT_METHOD: (f"blocks of different shapes, {STRUCTURED_QUANT_METHOD}): pip install hf-sparse and "
                              "import hf_sparse before from_pretrained"),
}


def guarded_method(config: dict[str, Any]) -> str | None:
    """The hf_sparse ``quant_method`` of a config dictionary that needs the guard, or ``None``."""
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return method if method in _WHY else None


def guard_message(quant_method: str) -> str:
    """The text plain transformers shows for a checkpoint with this ``quant_method``.

    >>> guard_message("hf_sparse_structured")
    'This checkpoint needs hf_sparse to load (blocks of different shapes, hf_sparse_structured): pip install hf-sparse and import hf_sparse before from_pretrained'
    """
    if quant_method not in _WHY:
        raise ValueError(f"no loading guard for quant_method {quant_method!r}; guarded: {sorted(_WHY)}")
    return f"{GUARD_PREFIX} ({_WHY[quant_method]}"


def guard_entries(quant_method: str, labels: dict | None) -> dict[str, str]:
    """``labels`` (an ``id2label``, or ``None``) with the guard entry added; keys become strings, as in JSON."""
    entries = {str(key): value for key, value in (labels or {}).items() if not _is_guard(key)}
    entries[guard_message(quant_method)] = GUARD_LABEL
    return entries


def add_guard(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``config.json`` dictionary with the guard entry when it needs one (else unchanged)."""
    method = guarded_method(config)
    if method is None:
        return strip_guard(config)
    return {**config, LABELS_KEY: guard_entries(method, config.get(LABELS_KEY))}


def strip_guard(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``config.json`` dictionary without the guard entry (``id2label`` dropped if nothing else is left)."""
    labels = config.get(LABELS_KEY)
    if not isinstance(labels, dict) or not any(_is_guard(key) for key in labels):
        return config
    rest = {key: value for key, value in labels.items() if not _is_guard(key)}
    config = {key: value for key, value in config.items() if key != LABELS_KEY}
    if rest:
        config[LABELS_KEY] = rest
    return config


def _is_guard(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(GUARD_PREFIX)
