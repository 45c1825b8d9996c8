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
carries ``quantization_config = {"quant_method": "hf_sparse_structured"}`` (and, when saved, the loading guard of
:mod:`hf_sparse.formats.guard`) so that transformers without hf_sparse refuses the checkpoint with an error naming
hf_sparse instead of loading wrong shapes, and hf_sparse's loader shrinks the empty model to these shapes
before any weight is read (:func:`shrink_to_structure`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..architectures import ArchitectureAdapter
from .apply import _configs, _submodule, apply_block_edit, block_shape
from .edits import RESIDUAL_POINTS, AttentionEdit, BlockEdit, MLPEdit, ResidualEdit

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
    blocks = adapter.blocks(model)
    entries = structure["blocks"]
    if len(entries) != len(blocks):
        raise ValueError(f"the structure record lists {len(entries)} blocks but the config builds {len(blocks)}; "
                         "config.json and its sparsity_config.structure disagree")
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


def validate_structure(data: Any) -> dict[str, Any]:
    """Check a ``structure`` entry read from ``config.json`` (untrusted); raises ``ValueError`` naming the bad field."""
    where = "sparsity_config.structure"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    if data.get("version") != STRUCTURE_VERSION:
        raise ValueError(f"{where}.version {data.get('version')!r} is not supported (reads {STRUCTURE_VERSION})")
    original = data.get("original")
    if not isinstance(original, dict) or not all(isinstance(v, int) and v >= 0 for v in original.values()) \
            or "num_blocks" not in original:
        raise ValueError(f"{where}.original must map dimension names to non-negative integers, got {original!r}")
    removed = data.get("removed_blocks")
    if not isinstance(removed, list) or not all(isinstance(i, int) and 0 <= i < original["num_blocks"] for i in removed):
        raise ValueError(f"{where}.removed_blocks must be a list of block indices below {original['num_blocks']}")
    blocks = data.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != original["num_blocks"] - len(set(removed)):
        raise ValueError(f"{where}.blocks must list the {original['num_blocks'] - len(set(removed or []))} remaining "
                         "blocks")
    for position, entry in enumerate(blocks):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}.blocks[{position}] must be an object")
        for key in _COUNTS:
            if key in entry and (not isinstance(entry[key], int) or entry[key] < 1):
                raise ValueError(f"{where}.blocks[{position}].{key} must be a positive integer, got {entry[key]!r}")
        if ("attention_heads" in entry) != ("kv_heads" in entry) or \
                ("kv_heads" in entry and entry["attention_heads"] % entry["kv_heads"]):
            raise ValueError(f"{where}.blocks[{position}]: attention_heads must be a multiple of kv_heads")
        if "residual_dims" in entry:
            dims, hidden = entry["residual_dims"], original.get("hidden_size")
            if not isinstance(hidden, int) or not isinstance(dims, dict) or set(dims) != set(RESIDUAL_POINTS) or \
                    not all(isinstance(n, int) and 1 <= n <= hidden for n in dims.values()):
                raise ValueError(f"{where}.blocks[{position}].residual_dims must give each of {list(RESIDUAL_POINTS)} "
                                 f"a count between 1 and original.hidden_size ({hidden!r}), got {dims!r}")
        biases = entry.get("new_biases", [])
        if not isinstance(biases, list) or not all(isinstance(b, str) for b in biases):
            raise ValueError(f"{where}.blocks[{position}].new_biases must be a list of module names")
    if not isinstance(data.get("block_parameters"), int) or data.get("loading") not in ("config", "hf_sparse"):
        raise ValueError(f"{where} needs block_parameters (an integer) and loading ('config' or 'hf_sparse')")
    return data


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
