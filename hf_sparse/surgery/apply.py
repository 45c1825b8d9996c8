"""The one place that applies block edits to modules: slicing heads and channels, adding biases, removing blocks.

Methods never touch modules; they return :class:`~hf_sparse.surgery.edits.StructuredEdits` and :func:`apply_edits`
makes every affected ``nn.Linear`` physically smaller (its ``weight``/``bias`` replaced by the kept rows/columns,
``in_features``/``out_features`` updated), fixes the attention module's head-count attributes, deletes removed blocks
and renumbers the rest (``layer_idx``, ``config.layer_types``, ``config.num_hidden_layers``) so generation with the KV
cache works. The same code shrinks an empty (meta-device) skeleton before a structured checkpoint's weights are
loaded (:func:`shrink_to_structure`), so loading never builds the dense model first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import ArchitectureAdapter, AttentionHeads, MLPChannels
from .edits import RESIDUAL_POINTS, AttentionEdit, BlockEdit, MLPEdit, ResidualEdit, StructuredEdits
from .residual import install_residual_dims, residual_widths

logger = logging.getLogger(__name__)


def _submodule(block: nn.Module, name: str) -> nn.Module:
    module = block
    for part in name.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class BlockShape:
    """The widths of one decoder block, read from its modules (``None`` for a structure the family does not declare)."""

    attention_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    mlp_channels: int | None
    #: residual dimensions read/written at each of RESIDUAL_POINTS, for a block pruned with a ResidualEdit
    residual_dims: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        shape: dict[str, Any] = {k: v for k, v in (("attention_heads", self.attention_heads),
                                                   ("kv_heads", self.kv_heads), ("mlp_channels", self.mlp_channels))
                                 if v is not None}
        if self.residual_dims is not None:
            shape["residual_dims"] = dict(zip(RESIDUAL_POINTS, self.residual_dims))
        return shape


def block_shape(adapter: ArchitectureAdapter, block: nn.Module) -> BlockShape:
    """Head and channel counts of ``block`` as its linears are now (works on meta-device skeletons too)."""
    heads = kv_heads = head_dim = channels = None
    if adapter.attention_heads is not None and "attention_heads" not in adapter.unsupported:
        decl = adapter.attention_heads
        head_dim = int(getattr(_submodule(block, decl.attention), decl.head_dim_attribute))
        query = _submodule(block, decl.query)
        if decl.layout == "fused_per_head":
            heads = kv_heads = query.out_features // (3 * head_dim)
        else:
            heads = query.out_features // head_dim
            kv_heads = _submodule(block, decl.key).out_features // head_dim
    if adapter.mlp_channels is not None and "mlp_channels" not in adapter.unsupported:
        channels = _submodule(block, adapter.mlp_channels.output).in_features
    widths = residual_widths(block)
    residual = tuple(widths[p] for p in RESIDUAL_POINTS) if widths is not None else None
    return BlockShape(heads, kv_heads, head_dim, channels, residual)


def _head_rows(head_indices, width: int) -> torch.Tensor:
    """Row indices of the given heads when head ``h`` occupies rows ``h*width : (h+1)*width``."""
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in head_indices])


def _slice_linear(module: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (output features) and ``cols`` (input features) of ``module``, in place."""
    if getattr(module, "_hf_hook", None) is not None and getattr(module._hf_hook, "offload", False):
        raise ValueError("structured pruning needs the weights in memory; load the model without CPU/disk offload")
    weight = module.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    module.out_features, module.in_features = weight.shape
    if module.bias is not None and rows is not None:
        bias = module.bias.detach().index_select(0, rows.to(weight.device))
        module.bias = nn.Parameter(bias.contiguous(), requires_grad=module.bias.requires_grad)


def _apply_attention(block: nn.Module, decl: AttentionHeads, edit: AttentionEdit, shape: BlockShape) -> None:
    per_group_kept = edit.validate(shape.attention_heads, shape.kv_heads)
    d = shape.head_dim
    out_cols = _head_rows(edit.kept_query_heads, d)
    if decl.layout == "fused_per_head":
        if edit.kept_query_heads != edit.kept_kv_heads:
            raise ValueError("fused per-head q/k/v (multi-head attention) keeps query and key/value heads together")
        _slice_linear(_submodule(block, decl.query), rows=_head_rows(edit.kept_query_heads, 3 * d))
    else:
        _slice_linear(_submodule(block, decl.query), rows=out_cols)
        kv_rows = _head_rows(edit.kept_kv_heads, d)
        _slice_linear(_submodule(block, decl.key), rows=kv_rows)
        _slice_linear(_submodule(block, decl.value), rows=kv_rows)
    _slice_linear(_submodule(block, decl.output), cols=out_cols)
    attention = _submodule(block, decl.attention)
    if decl.group_attribute is not None and hasattr(attention, decl.group_attribute):
        setattr(attention, decl.group_attribute, per_group_kept)
    if decl.heads_attribute is not None:
        setattr(attention, decl.heads_attribute, len(edit.kept_query_heads))


def _apply_mlp(block: nn.Module, decl: MLPChannels, edit: MLPEdit, shape: BlockShape) -> None:
    if edit.kept_channels[-1] >= shape.mlp_channels:
        raise ValueError(f"kept_channels go up to {edit.kept_channels[-1]} but the MLP has {shape.mlp_channels}")
    channels = torch.tensor(edit.kept_channels)
    rows = torch.cat([channels, channels + shape.mlp_channels]) if decl.fused_halves else channels
    for name in decl.inputs:
        _slice_linear(_submodule(block, name), rows=rows)
    _slice_linear(_submodule(block, decl.output), cols=channels)


def _apply_residual(adapter: ArchitectureAdapter, block: nn.Module, edit: ResidualEdit, model_type: str | None) -> None:
    """Fold the residual selections into the linears that read (columns) and write (rows) the stream, then install
    the index_select / index_add hooks (:mod:`.residual`)."""
    decl = adapter.structure("residual_dims", model_type)
    heads, mlp = adapter.structure("attention_heads", model_type), adapter.structure("mlp_channels", model_type)
    if heads.layout != "separate" or mlp.fused_halves:
        raise ValueError(f"architecture {model_type!r} declares residual_dims but fused projections; residual "
                         "selections need separate q/k/v and gate/up linears")
    query = _submodule(block, heads.query)
    hidden = query.in_features
    sites = {"attention_input": ((heads.query, heads.key, heads.value), "cols"),
             "attention_output": ((heads.output,), "rows"),
             "mlp_input": (mlp.inputs, "cols"), "mlp_output": ((mlp.output,), "rows")}
    kept: dict[str, torch.Tensor] = {}
    for point, (names, side) in sites.items():
        if getattr(edit, point) is None:
            continue
        indices = torch.tensor(edit.kept(point, hidden), dtype=torch.int64)
        for name in names:
            _slice_linear(_submodule(block, name), **{side: indices})
        kept[point] = indices.to(query.weight.device)
    install_residual_dims(block, decl, hidden, kept)


def _add_bias(block: nn.Module, name: str, delta: torch.Tensor) -> None:
    module = _submodule(block, name)
    delta = delta.detach().reshape(-1)
    if delta.numel() != module.out_features:
        raise ValueError(f"new bias for {name!r} has {delta.numel()} entries, the module has {module.out_features} "
                         "outputs")
    weight = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(delta.to(weight.device, weight.dtype).clone(), requires_grad=weight.requires_grad)
    else:
        module.bias = nn.Parameter((module.bias.detach().float() + delta.to(module.bias.device).float())
                                   .to(module.bias.dtype), requires_grad=module.bias.requires_grad)


def apply_block_edit(adapter: ArchitectureAdapter, block: nn.Module, edit: BlockEdit, model_type: str) -> None:
    """Apply ``edit`` to one decoder block in place (biases are added after slicing, on the new shapes)."""
    shape = block_shape(adapter, block)
    if edit.attention is not None:
        _apply_attention(block, adapter.structure("attention_heads", model_type), edit.attention, shape)
    if edit.mlp is not None:
        _apply_mlp(block, adapter.structure("mlp_channels", model_type), edit.mlp, shape)
    if edit.residual is not None:
        _apply_residual(adapter, block, edit.residual, model_type)
    for name, delta in edit.new_biases.items():
        _add_bias(block, name, delta)


def remove_blocks(model: nn.Module, adapter: ArchitectureAdapter, removed: tuple[int, ...]) -> None:
    """Delete decoder blocks ``removed`` and renumber the rest for the KV cache and the config."""
    if not removed:
        return
    blocks = adapter.blocks(model)
    if removed[-1] >= len(blocks):
        raise ValueError(f"cannot remove block {removed[-1]}: the model has {len(blocks)} blocks")
    if len(removed) >= len(blocks):
        raise ValueError(f"cannot remove all {len(blocks)} decoder blocks")
    kept = [block for index, block in enumerate(blocks) if index not in set(removed)]
    for new_index, block in enumerate(kept):
        for module in block.modules():
            # Attention modules index the KV cache by layer_idx; decoder layers of some families store it too.
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_index
    # Replace the contents, not the ModuleList object: the model (and accelerate hooks) hold a reference to it.
    for index in range(len(blocks) - 1, -1, -1):
        del blocks[index]
    blocks.extend(kept)
    for config in _configs(model):
        if getattr(config, adapter.blocks_key, None) is not None:
            setattr(config, adapter.blocks_key, len(kept))
        for key in adapter.per_layer_keys:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == len(kept) + len(removed):
                setattr(config, key, type(values)(v for i, v in enumerate(values) if i not in set(removed)))


def _configs(model: nn.Module) -> list:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def apply_edits(model: nn.Module, adapter: ArchitectureAdapter, edits: StructuredEdits) -> None:
    """Apply every block edit, then remove blocks. Indices in ``edits`` refer to the model as it is on entry.

    >>> apply_edits(model, get_architecture(model), StructuredEdits(removed_blocks=(3,)))  # doctest: +SKIP
    """
    model_type = getattr(model.config, "model_type", None)
    blocks = adapter.blocks(model)
    if edits.removed_blocks:
        adapter.structure("blocks", model_type)
    for index, edit in sorted(edits.blocks.items()):
        if edit is None:
            continue
        if not 0 <= index < len(blocks):
            raise ValueError(f"edit for block {index}, but the model has {len(blocks)} blocks")
        apply_block_edit(adapter, blocks[index], edit, model_type)
    remove_blocks(model, adapter, edits.removed_blocks)
    logger.info("applied structured edits: %d blocks edited, %d removed", len(edits.blocks), len(edits.removed_blocks))
