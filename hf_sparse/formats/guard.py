"""Checkpoints only hf_sparse can load carry a ``model_type`` of hf_sparse's own, so other loaders refuse them by name.

Two kinds of checkpoint need hf_sparse to load: compact storage (``quantization_config.quant_method ==
"hf_sparse_compact"``: the stored values are not the layers' shapes) and structured checkpoints whose blocks differ in
shape (``"hf_sparse_structured"``). transformers 5 does not raise on a ``quant_method`` it does not know: it logs
"Unknown quantization type ... we will skip the quantization" and builds the dense model, and serving engines read
``model_type`` and the shapes of the config alone.

So the ``config.json`` of such a checkpoint says what it is in ``model_type`` — the quant method's name,
``"hf_sparse_compact"`` or ``"hf_sparse_structured"`` — and keeps the architecture's own type in
:data:`ORIGINAL_TYPE_KEY`. Without hf_sparse, transformers stops before any weight is read with its own error::

    ValueError: The checkpoint you are trying to load has model type `hf_sparse_structured` but Transformers does not
    recognize this architecture. ...

and a serving engine refuses the unknown architecture by name. With ``import hf_sparse``,
:mod:`hf_sparse.integrations.loading_guard` puts the original type back while the config is read
(:func:`strip_guard`), so the model, its class and ``model.config.model_type`` are exactly those of the architecture,
and writes the hf_sparse type again whenever such a model is saved (:func:`add_guard`).

Checkpoints written before this (the first guard: an entry in ``id2label`` whose key explained the need) still load:
:func:`strip_guard` removes that entry too.

>>> config = {"model_type": "llama", "quantization_config": {"quant_method": "hf_sparse_compact"}}
>>> guarded = add_guard(config)
>>> guarded["model_type"], guarded[ORIGINAL_TYPE_KEY], strip_guard(guarded) == config
('hf_sparse_compact', 'llama', True)
"""

from __future__ import annotations

from typing import Any

from ..errors import shown
from ..surgery import STRUCTURED_QUANT_METHOD
from .compact import STORAGE_FORMAT

#: where a guarded ``config.json`` keeps the architecture's own ``model_type``
ORIGINAL_TYPE_KEY = "hf_sparse_original_model_type"
#: the ``model_type`` of a checkpoint only hf_sparse loads, by the quant method that makes it so
GUARDED_TYPES = {STORAGE_FORMAT: STORAGE_FORMAT, STRUCTURED_QUANT_METHOD: STRUCTURED_QUANT_METHOD}
# The first guard (an id2label entry), still recognised and removed when read.
LABELS_KEY = "id2label"
LEGACY_GUARD_PREFIX = "This checkpoint needs hf_sparse to load"


def guarded_method(config: dict[str, Any]) -> str | None:
    """The hf_sparse ``quant_method`` of a config dictionary that needs the guard, or ``None``."""
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return method if method in GUARDED_TYPES else None


def add_guard(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``config.json`` dictionary with hf_sparse's ``model_type`` when it needs one (else unguarded)."""
    config = strip_guard(config)
    method = guarded_method(config)
    if method is None:
        return config
    original = config.get("model_type")
    if not isinstance(original, str) or not original:
        raise ValueError(f"config has no model_type (got {shown(original)}): a checkpoint that needs hf_sparse to "
                         "load keeps its architecture's model_type beside hf_sparse's")
    return {**config, "model_type": GUARDED_TYPES[method], ORIGINAL_TYPE_KEY: original}


def strip_guard(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``config.json`` dictionary as the architecture wrote it: the original ``model_type`` back (and the
    first guard's ``id2label`` entry removed; ``id2label`` dropped if nothing else is left)."""
    labels = config.get(LABELS_KEY)
    if isinstance(labels, dict) and any(_is_legacy_guard(key) for key in labels):
        rest = {key: value for key, value in labels.items() if not _is_legacy_guard(key)}
        config = {key: value for key, value in config.items() if key != LABELS_KEY}
        if rest:
            config[LABELS_KEY] = rest
    kind = config.get("model_type")
    if kind not in GUARDED_TYPES.values():
        return config
    original = config.get(ORIGINAL_TYPE_KEY)
    if not isinstance(original, str) or not original or original in GUARDED_TYPES.values():
        raise ValueError(f"config.json has model_type {kind!r} but its {ORIGINAL_TYPE_KEY} is {shown(original)}: "
                         "the architecture's model_type (e.g. 'llama') is needed to load it")
    config = {key: value for key, value in config.items() if key != ORIGINAL_TYPE_KEY}
    config["model_type"] = original
    return config


def _is_legacy_guard(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(LEGACY_GUARD_PREFIX)
