"""The shape record of a structurally pruned model, and the config it needs to load.

Stored as ``config.sparsity_config["structure"]`` (record ``format_version`` 2)::

    "structure": {
      "version": 1,
      "original": {"num_blocks": 6, "block_parameters": 4722432, "attention_heads": 8, "kv_heads": 4,
                   "head_dim": 32, "mlp_channels": 768},
      "removed_blocks": [3],                        # original indices
      "blocks": [{"original_index": 0, "attention_heads": 6, "kv_heads": 3, "mlp_channels": 512,
                  "new_biases": ["mlp.down_proj"]}, ...],   # one entry per remaining block, in order
      "block_parameters": 3305472,                  # decoder-block parameters now
      "loading": "config"                           # or "hf_sparse"
    }

A block that reads and writes its own residual dimensions (DISP-LLM, :class:`~hf_sparse.surgery.edits.ResidualEdit`)
also has ``"residual_dims": {"attention_input": 180, "attention_output": 201, "mlp_input": 190, "mlp_output": 222}``
(counts, out of ``original["hidden_size"]``); which dimensions they are is stored in the checkpoint itself, as the
int64 buffers ``<block>.residual_dims.<point>`` (:mod:`.residual`), so the record stays small at any width.

``loading == "config"``: every block has the same shape and the config's own keys (``num_hidden_layers``,
``intermediate_size``, ``num_attention_heads``, ...) were rewritten, so plain transformers loads the checkpoint.
``"hf_sparse"``: the blocks differ (or gained biases, or have a shape the config class refuses to save, such as a
head count that does not divide ``hidden_size``); the config keeps the dense widths and
carries ``quantization_config = {"quant_method": "hf_sparse_structured"}`` (and, when saved, ``model_type:
"hf_sparse_structured"``, see :mod:`hf_sparse.formats.guard`) so that transformers without hf_sparse refuses the
checkpoint naming that type instead of loading wrong shapes, and hf_sparse's loader shrinks the empty model to these
shapes before any weight is read (:func:`shrink_to_structure`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ..architectures import ArchitectureAdapter
from ..errors import shown
from .apply import _configs, _submodule, apply_block_edit, block_shape
from .edits import RESIDUAL_POINTS, AttentionEdit, BlockEdit, MLPEdit, ResidualEdit
from .residual import RESIDUAL_MODULE, residual_widths

STRUCTURE_VERSION = 1
#: quant_method of the marker that makes plain transformers refuse a checkpoint only hf_sparse can shape
STRUCTURED_QUANT_METHOD = "hf_sparse_structured"
_COUNTS = ("attention_heads", "kv_heads", "mlp_channels")


def block_parameters(adapter: ArchitectureAdapter, model: nn.Module) -> int:
    """Number of parameters in the decoder blocks (weights, biases and norms)."""
    return sum(p.numel() for p in adapter.blocks(model).parameters())


def parameters_per_block(adapter: ArchitectureAdapter, model: nn.Module) -> list[int]:
    """Parameters of each decoder block, in order (what a per-block structured target is a share of)."""
    return [sum(p.numel() for p in block.parameters()) for block in adapter.blocks(model)]


def removed_per_block(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any],
                      dense_sizes: list[int]) -> dict[int, float]:
    """Share of each original block's parameters that is gone (1.0 for a removed block), by original index, for
    ``model`` after its edits; ``dense_sizes`` is :func:`parameters_per_block` of the dense model."""
    shares = {index: 1.0 for index in structure["removed_blocks"]}
    for entry, size in zip(structure["blocks"], parameters_per_block(adapter, model)):
        shares[entry["original_index"]] = 1.0 - size / dense_sizes[entry["original_index"]]
    return dict(sorted(shares.items()))


def unit_parameters(adapter: ArchitectureAdapter, block: nn.Module) -> dict[str, int]:
    """Parameters one removable unit of ``block`` holds: ``"kv_group"`` (a key/value head with its query heads; one
    head in multi-head attention), ``"query_head"`` (one query head alone) and ``"mlp_channel"``."""
    shape = block_shape(adapter, block)
    costs: dict[str, int] = {}
    if shape.attention_heads is not None:
        decl = adapter.attention_heads
        d = shape.head_dim
        query, output = _submodule(block, decl.query), _submodule(block, decl.output)
        q_row = query.in_features + (query.bias is not None)
        out_col = output.out_features
        if decl.layout == "fused_per_head":
            costs["query_head"] = costs["kv_group"] = 3 * d * q_row + d * out_col
        else:
            key, value = _submodule(block, decl.key), _submodule(block, decl.value)
            kv_rows = d * (key.in_features + (key.bias is not None) + value.in_features + (value.bias is not None))
            costs["query_head"] = d * q_row + d * out_col
            costs["kv_group"] = (shape.attention_heads // shape.kv_heads) * costs["query_head"] + kv_rows
    if shape.mlp_channels is not None:
        decl = adapter.mlp_channels
        per_channel = sum(_submodule(block, n).in_features + (_submodule(block, n).bias is not None)
                          for n in decl.inputs)
        costs["mlp_channel"] = per_channel * (2 if decl.fused_halves else 1) + _submodule(block, decl.output).out_features
    return costs


def original_description(adapter: ArchitectureAdapter, model: nn.Module) -> dict[str, Any]:
    """The ``"original"`` entry, read from the dense model before any edit."""
    shape = block_shape(adapter, adapter.blocks(model)[0])
    return {"num_blocks": len(adapter.blocks(model)), "block_parameters": block_parameters(adapter, model),
            **shape.to_dict(), **({"head_dim": shape.head_dim} if shape.head_dim is not None else {})}


def describe_structure(adapter: ArchitectureAdapter, model: nn.Module, original: dict[str, Any],
                       removed_blocks: tuple[int, ...], new_biases: dict[int, list[str]]) -> dict[str, Any]:
    """The ``"structure"`` entry of the record for ``model`` after its edits were applied (before the config step)."""
    removed = set(removed_blocks)
    surviving = [i for i in range(original["num_blocks"]) if i not in removed]
    blocks = []
    for original_index, block in zip(surviving, adapter.blocks(model)):
        entry = {"original_index": original_index, **block_shape(adapter, block).to_dict()}
        if new_biases.get(original_index):
            entry["new_biases"] = sorted(new_biases[original_index])
        blocks.append(entry)
    original = dict(original)
    if any("residual_dims" in entry for entry in blocks):
        original["hidden_size"] = _hidden_size(adapter, adapter.blocks(model))
    return {"version": STRUCTURE_VERSION, "original": original, "removed_blocks": sorted(removed),
            "blocks": blocks, "block_parameters": block_parameters(adapter, model), "loading": "hf_sparse"}


def _hidden_size(adapter: ArchitectureAdapter, blocks) -> int:
    """The residual width, from a block that reads all of it (q_proj's inputs) or from one that records it."""
    for block in blocks:
        dims = block._modules.get("residual_dims")
        if dims is not None:
            return dims.hidden_size
    return _submodule(blocks[0], adapter.attention_heads.query).in_features


#: model_type -> {linear that may gain a bias: (config key giving biases to a whole sub-block, its linears)}: a new
#: bias (FLAP's compensation) on every block's o_proj / down_proj is a stock config once the key is set and the
#: sub-block's other linears get zero biases (Llama's attention_bias covers q/k/v/o, mlp_bias gate/up/down)
STOCK_BIAS_KEYS = {
    "llama": {"self_attn.o_proj": ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj")),
              "mlp.down_proj": ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))},
}


def _stock_biases(model_type: str | None, structure: dict[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """``{config key: linears}`` that describe the blocks' new biases (all blocks alike), or ``None`` if none do."""
    biased = {tuple(sorted(b.get("new_biases", ()))) for b in structure["blocks"]}
    if len(biased) != 1:
        return None
    keys = STOCK_BIAS_KEYS.get(model_type, {})
    names = biased.pop()
    if not all(name in keys for name in names):
        return None
    return dict(keys[name] for name in names)


def _rewritable(adapter: ArchitectureAdapter, structure: dict[str, Any], model_type: str | None = None) -> bool:
    """Whether one set of config keys describes every block (then plain transformers can build the model)."""
    blocks, original = structure["blocks"], structure["original"]
    if any(b.get("residual_dims") for b in blocks):
        return False
    if any(b.get("new_biases") for b in blocks) and _stock_biases(model_type, structure) is None:
        return False
    shapes = {tuple(b.get(k) for k in _COUNTS) for b in blocks}
    if len(shapes) != 1:
        return False
    heads, kv_heads, _channels = shapes.pop()
    decl = adapter.attention_heads
    if heads is not None and heads != original.get("attention_heads") and decl.head_dim_key is None:
        return False
    if kv_heads is not None and kv_heads != original.get("kv_heads") and decl.kv_heads_key is None and \
            heads != kv_heads:
        return False
    return True


def _config_updates(adapter: ArchitectureAdapter, structure: dict[str, Any]) -> dict[str, Any]:
    """The config keys that describe blocks which all have the first block's shape."""
    original, first = structure["original"], structure["blocks"][0]
    updates: dict[str, Any] = {}
    if "attention_heads" in first and first["attention_heads"] != original["attention_heads"]:
        decl = adapter.attention_heads
        updates[decl.heads_key] = first["attention_heads"]
        if decl.kv_heads_key is not None:
            updates[decl.kv_heads_key] = first["kv_heads"]
        updates[decl.head_dim_key] = original["head_dim"]  # no longer hidden_size // heads
    if "mlp_channels" in first and first["mlp_channels"] != original["mlp_channels"]:
        updates[adapter.mlp_channels.width_key] = first["mlp_channels"]
    return updates


def _config_accepts(config, updates: dict[str, Any]) -> bool:
    """Whether ``config``'s class accepts ``updates``: transformers validates a config when it is saved, and some
    classes refuse shapes the model itself runs (Llama wants ``hidden_size`` divisible by ``num_attention_heads``
    even with an explicit ``head_dim``: 6 of 8 heads left at width 256 cannot be written as config keys)."""
    trial = copy.deepcopy(config)
    try:
        for key, value in updates.items():
            setattr(trial, key, value)
        validate = getattr(trial, "validate", None)
        if validate is not None:
            validate()
    except Exception:  # noqa: BLE001 - any refusal (ValueError, huggingface_hub's strict-dataclass errors) means no
        return False
    return True


def finish_config(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the config's own keys where every block has one shape, else mark the config as needing hf_sparse.

    Returns ``structure`` with ``"loading"`` set. Block removal has already shortened ``num_hidden_layers``. New
    biases alike in every block become the config's bias keys (:data:`STOCK_BIAS_KEYS`): the sub-block's other
    linears get zero biases, which change no output, and ``block_parameters`` counts them.
    """
    model_type = getattr(model.config, "model_type", None)
    updates = _config_updates(adapter, structure) if _rewritable(adapter, structure, model_type) else None
    biases = _stock_biases(model_type, structure) if updates is not None else None
    if updates is not None:
        updates.update({key: True for key in biases or {}})
    if updates is not None and all(_config_accepts(config, updates) for config in _configs(model)):
        for block in adapter.blocks(model):
            for linears in (biases or {}).values():
                for name in linears:
                    module = _submodule(block, name)
                    if module.bias is None:
                        module.bias = nn.Parameter(module.weight.new_zeros(module.out_features),
                                                   requires_grad=module.weight.requires_grad)
        if biases:
            structure["block_parameters"] = block_parameters(adapter, model)
        for config in _configs(model):
            for key, value in updates.items():
                setattr(config, key, value)
        structure["loading"] = "config"
    else:
        structure["loading"] = "hf_sparse"
        mark_for_loading(model, structure)
    return structure


def mark_for_loading(model: nn.Module, structure: dict[str, Any] | None) -> None:
    """Put the ``quantization_config`` marker on the config of a model only hf_sparse can shape (see module doc)."""
    if structure is not None and structure.get("loading") == "hf_sparse":
        model.config.quantization_config = {"quant_method": STRUCTURED_QUANT_METHOD}


def shrink_to_structure(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any]) -> None:
    """Give a freshly built model (usually an empty meta-device skeleton) the shapes ``structure`` records.

    The kept heads and channels become the first ones of each block: the checkpoint stores the kept rows in order,
    so their original positions do not matter for loading. Kept residual dimensions do matter (they say where in
    the full-width stream a block reads and writes): the skeleton gets placeholder index buffers of the recorded
    sizes, which the checkpoint's ``residual_dims`` buffers then fill.
    """
    check_structure_fits(adapter, model, structure, dense=True)
    blocks = adapter.blocks(model)
    entries = structure["blocks"]
    model_type = getattr(model.config, "model_type", None)
    for block, entry in zip(blocks, entries):
        now = block_shape(adapter, block)
        edit = BlockEdit()
        if "attention_heads" in entry and (entry["attention_heads"], entry["kv_heads"]) != \
                (now.attention_heads, now.kv_heads):
            per_group_now = now.attention_heads // now.kv_heads
            per_group = entry["attention_heads"] // entry["kv_heads"]
            edit.attention = AttentionEdit(
                tuple(range(entry["kv_heads"])),
                tuple(g * per_group_now + r for g in range(entry["kv_heads"]) for r in range(per_group)),
            )
        if "mlp_channels" in entry and entry["mlp_channels"] != now.mlp_channels:
            edit.mlp = MLPEdit(tuple(range(entry["mlp_channels"])))
        if "residual_dims" in entry:
            hidden = structure["original"]["hidden_size"]
            edit.residual = ResidualEdit(**{p: tuple(range(n)) for p, n in entry["residual_dims"].items()
                                            if n != hidden})
        apply_block_edit(adapter, block, edit, model_type)
        for name in entry.get("new_biases", ()):
            module = _submodule(block, name)
            if module.bias is None:
                module.bias = nn.Parameter(module.weight.new_zeros(module.out_features),
                                           requires_grad=module.weight.requires_grad)


_ORIGINAL_KEYS = ("num_blocks", "block_parameters", "attention_heads", "kv_heads", "head_dim", "mlp_channels",
                  "hidden_size")
_BLOCK_KEYS = ("original_index", *_COUNTS, "residual_dims", "new_biases")
#: bound on every count in a record before anything is built from it (a hostile 10**9 never reaches a range())
_MAX_COUNT = 1 << 31
_MODULE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")


def _check_residual(where: str, block: nn.Module, entry: dict[str, Any]) -> None:
    """A loaded block's residual selections: the widths the record gives, indices unique, in order and in range."""
    dims = block._modules.get(RESIDUAL_MODULE)
    if dims is None:
        if "residual_dims" in entry:
            raise ValueError(f"{where} records residual_dims but the model's block selects no residual dimensions")
        return
    widths = residual_widths(block)
    if widths != entry.get("residual_dims"):
        raise ValueError(f"{where}: the model's block reads/writes residual widths {widths} but the record says "
                         f"{shown(entry.get('residual_dims'))}")
    for point in RESIDUAL_POINTS:
        indices = dims.indices(point)
        if indices is None:
            continue
        if indices.dtype != torch.int64 or indices.dim() != 1 or indices.device.type == "meta":
            raise ValueError(f"{where}: residual_dims.{point} must be a loaded int64 vector of indices")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dims.hidden_size or
                                bool((indices[1:] <= indices[:-1]).any())):
            raise ValueError(f"{where}: residual_dims.{point} must be increasing indices in [0, {dims.hidden_size}), "
                             f"got {shown(indices.tolist())}; the checkpoint was edited")


def check_loaded_structure(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any] | None) -> None:
    """After loading a structured checkpoint: the model has the blocks and shapes its record says (a config edited to
    build more blocks than were saved would otherwise leave random ones), with valid residual selections."""
    if structure is not None:
        check_structure_fits(adapter, model, structure, dense=False)


def validate_structure(data: Any) -> dict[str, Any]:
    """Check a ``structure`` entry read from ``config.json`` (untrusted); raises ``ValueError`` naming the bad field.

    Every count is bounded by the original one it shrinks (and those by :data:`_MAX_COUNT`), indices are unique and
    in range, module names are plain dotted names: nothing here builds anything. What the record says is checked
    against the model itself by :func:`check_structure_fits` before any module is reshaped.

    >>> validate_structure({"version": 1, "original": {"num_blocks": 2, "block_parameters": 10}, "removed_blocks": [1, 1],
    ...                     "blocks": [], "block_parameters": 5, "loading": "config"})
    Traceback (most recent call last):
    ...
    ValueError: sparsity_config.structure.removed_blocks must be increasing block indices below 2 without repeats, got [1, 1]
    """
    where = "sparsity_config.structure"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"version", "original", "removed_blocks", "blocks", "block_parameters", "loading"})
    if unknown:
        raise ValueError(f"{where} has unknown keys {shown(unknown)}")
    if data.get("version") != STRUCTURE_VERSION or isinstance(data.get("version"), bool):
        raise ValueError(f"{where}.version {shown(data.get('version'))} is not supported (reads {STRUCTURE_VERSION})")
    original = data.get("original")
    if not isinstance(original, dict) or not all(isinstance(k, str) and _is_count(v) for k, v in original.items()) \
            or "num_blocks" not in original or "block_parameters" not in original:
        raise ValueError(f"{where}.original must map dimension names to positive integers (below {_MAX_COUNT}) and "
                         f"hold num_blocks and block_parameters, got {shown(original)}")
    unknown = sorted(set(original) - set(_ORIGINAL_KEYS))
    if unknown:
        raise ValueError(f"{where}.original has unknown keys {shown(unknown)}; allowed: {list(_ORIGINAL_KEYS)}")
    num_blocks = original["num_blocks"]
    removed = data.get("removed_blocks")
    if not isinstance(removed, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_blocks
                                                for i in removed) or removed != sorted(set(removed)):
        raise ValueError(f"{where}.removed_blocks must be increasing block indices below {num_blocks} without "
                         f"repeats, got {shown(removed)}")
    blocks = data.get("blocks")
    surviving = [i for i in range(num_blocks) if i not in set(removed)] if num_blocks <= len(removed) + 100_000 \
        else None
    if not isinstance(blocks, list) or surviving is None or len(blocks) != len(surviving):
        raise ValueError(f"{where}.blocks must list the {num_blocks - len(removed)} remaining blocks, got "
                         f"{len(blocks) if isinstance(blocks, list) else shown(blocks)}")
    for position, (entry, index) in enumerate(zip(blocks, surviving)):
        _validate_block(f"{where}.blocks[{position}]", entry, index, original)
    parameters = data.get("block_parameters")
    if not _is_count(parameters) or parameters > original["block_parameters"]:
        raise ValueError(f"{where}.block_parameters must be a positive integer at most original.block_parameters "
                         f"({original['block_parameters']}), got {shown(parameters)}")
    if data.get("loading") not in ("config", "hf_sparse"):
        raise ValueError(f"{where}.loading must be 'config' or 'hf_sparse', got {shown(data.get('loading'))}")
    return data


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < _MAX_COUNT


def _validate_block(where: str, entry: Any, index: int, original: dict[str, int]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {shown(entry)}")
    unknown = sorted(set(entry) - set(_BLOCK_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {shown(unknown)}; allowed: {list(_BLOCK_KEYS)}")
    if entry.get("original_index") != index or isinstance(entry.get("original_index"), bool):
        raise ValueError(f"{where}.original_index must be {index} (the blocks not removed, in order), got "
                         f"{shown(entry.get('original_index'))}")
    for key in _COUNTS:
        if key in entry:
            bound = original.get(key)
            if bound is None or not _is_count(entry[key]) or entry[key] > bound:
                raise ValueError(f"{where}.{key} must be a positive integer at most original.{key} ({bound}), got "
                                 f"{shown(entry[key])}")
    if ("attention_heads" in entry) != ("kv_heads" in entry) or \
            ("kv_heads" in entry and entry["attention_heads"] % entry["kv_heads"]):
        raise ValueError(f"{where}: attention_heads must be a multiple of kv_heads")
    if "residual_dims" in entry:
        dims, hidden = entry["residual_dims"], original.get("hidden_size")
        if not isinstance(hidden, int) or not isinstance(dims, dict) or set(dims) != set(RESIDUAL_POINTS) or \
                not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= hidden for n in dims.values()):
            raise ValueError(f"{where}.residual_dims must give each of {list(RESIDUAL_POINTS)} a count between 1 and "
                             f"original.hidden_size ({hidden!r}), got {shown(dims)}")
    biases = entry.get("new_biases", [])
    if not isinstance(biases, list) or not all(isinstance(b, str) and len(b) <= 200 and _MODULE_NAME.fullmatch(b) for b in biases) \
            or len(set(biases)) != len(biases):
        raise ValueError(f"{where}.new_biases must be a list of distinct module names (such as 'mlp.down_proj'), got "
                         f"{shown(biases)}")


def check_structure_fits(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any],
                         dense: bool) -> None:
    """Check a validated ``structure`` against ``model`` before anything is built from it: as many blocks, the
    original dimensions the model's (when ``dense``: a skeleton built from a config that keeps the dense widths) or
    each block's recorded shape (when not: a model as loaded), and every ``new_biases`` name a linear of its block.
    Raises a one-line ``ValueError`` saying what disagrees."""
    where = "sparsity_config.structure"
    blocks = adapter.blocks(model)
    if len(blocks) != len(structure["blocks"]):
        raise ValueError(f"{where} lists {len(structure['blocks'])} blocks but the model has {len(blocks)} "
                         "(config.json's num_hidden_layers and the record disagree); the checkpoint was edited")
    original = structure["original"]
    if "hidden_size" in original and blocks:
        hidden = _hidden_size(adapter, blocks)
        if original["hidden_size"] != hidden:
            raise ValueError(f"{where}.original.hidden_size is {original['hidden_size']} but the model's residual "
                             f"width is {hidden}; the record does not describe this model")
    for position, (block, entry) in enumerate(zip(blocks, structure["blocks"])):
        shape = block_shape(adapter, block).to_dict()
        if shape.get("residual_dims") is None:
            shape.pop("residual_dims", None)
        for key in _COUNTS:
            if key not in shape and key not in entry:
                continue
            expected = original.get(key) if dense else entry.get(key, original.get(key))
            if shape.get(key) != expected:
                raise ValueError(f"{where}.blocks[{position}]: the model's block has {key} {shape.get(key)} but the "
                                 f"record says {expected} ({'original' if dense else 'kept'}); the record does not "
                                 "describe this model")
        if not dense:
            _check_residual(f"{where}.blocks[{position}]", block, entry)
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        for name in entry.get("new_biases", ()):
            if name not in linears:
                raise ValueError(f"{where}.blocks[{position}].new_biases names {shown(name)}, which is not a linear "
                                 f"layer of the block (its linears: {shown(sorted(linears))})")


def removed_fraction(structure: dict[str, Any]) -> float:
    """Fraction of the dense model's decoder-block parameters that are gone."""
    return 1.0 - structure["block_parameters"] / structure["original"]["block_parameters"]


def apply_and_describe(adapter: ArchitectureAdapter, model: nn.Module, edits) -> dict[str, Any]:
    """Apply ``edits`` (a :class:`~hf_sparse.surgery.edits.StructuredEdits`) to a dense ``model`` and return its
    ``structure`` record, with the config rewritten or marked for loading."""
    from .apply import apply_edits

    original = original_description(adapter, model)
    new_biases = {i: list(e.new_biases) for i, e in edits.blocks.items() if e is not None and e.new_biases}
    apply_edits(model, adapter, edits)
    structure = describe_structure(adapter, model, original, edits.removed_blocks, new_biases)
    return finish_config(adapter, model, structure)


def shape_rows(adapter: ArchitectureAdapter, model: nn.Module, structure: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per remaining block for model cards: its shape against the original, the share of its parameters
    removed, and its parameters now.

    >>> shape_rows(adapter, model, structure)[0]["name"]  # doctest: +SKIP
    'block 0: 6/8 heads, 3/4 KV heads, 512/768 MLP channels'
    """
    original = structure["original"]
    per_block = original["block_parameters"] / original["num_blocks"]
    rows = []
    for position, (entry, block) in enumerate(zip(structure["blocks"], adapter.blocks(model))):
        parts = []
        if "attention_heads" in entry:
            parts.append(f"{entry['attention_heads']}/{original['attention_heads']} heads")
            if original.get("kv_heads") != original.get("attention_heads"):
                parts.append(f"{entry['kv_heads']}/{original['kv_heads']} KV heads")
        if "mlp_channels" in entry:
            parts.append(f"{entry['mlp_channels']}/{original['mlp_channels']} MLP channels")
        if entry.get("residual_dims"):
            dims, hidden = entry["residual_dims"], original["hidden_size"]
            parts.append(f"residual dims read/written: attention {dims['attention_input']}/{dims['attention_output']}"
                         f", MLP {dims['mlp_input']}/{dims['mlp_output']} of {hidden}")
        if entry.get("new_biases"):
            parts.append("new biases on " + ", ".join(entry["new_biases"]))
        moved = f" (was block {entry['original_index']})" if entry["original_index"] != position else ""
        kept = sum(p.numel() for p in block.parameters())
        rows.append({"name": f"block {position}{moved}: " + ", ".join(parts), "sparsity": 1 - kept / per_block,
                     "weights": kept})
    return rows


def shape_summary(structure: dict[str, Any]) -> str:
    """One paragraph for model cards: what was removed and how the checkpoint loads."""
    original = structure["original"]
    removed = structure["removed_blocks"]
    text = (f"Structured pruning: whole attention heads, MLP channels or decoder blocks were removed, so the matrices "
            f"are physically smaller ({structure['block_parameters']:,} of {original['block_parameters']:,} "
            f"decoder-block parameters remain, {len(structure['blocks'])} of {original['num_blocks']} blocks")
    text += f"; removed blocks {removed})." if removed else ")."
    if any("residual_dims" in b for b in structure["blocks"]):
        text += (f" Each block reads and writes its own subset of the {original['hidden_size']} residual-stream "
                 "dimensions (DISP-LLM): its attention and MLP select their inputs after the full-width norms and "
                 "add their outputs back at their own dimensions.")
    if structure["loading"] == "config":
        text += (" Every block has the same shape and config.json says so: plain transformers (and serving engines) "
                 "load it without hf_sparse.")
    else:
        text += (" The blocks differ in shape: load it with `import hf_sparse` first (config.json carries "
                 f"quantization_config {{\"quant_method\": \"{STRUCTURED_QUANT_METHOD}\"}}; transformers without "
                 "hf_sparse refuses it with an error that says hf_sparse is needed, instead of loading wrong shapes).")
    return text
