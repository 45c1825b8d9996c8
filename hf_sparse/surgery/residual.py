"""Per-block residual-stream dimensions (DISP-LLM): the runtime selection, and the masking it is exactly equal to.

A block pruned this way keeps its full-width norms and the full-width residual stream, but its attention block reads
only some normed dimensions and writes only some, and so does its MLP (:class:`~hf_sparse.surgery.edits.ResidualEdit`).
The selections are folded into the neighbouring matrices where that is exact: q/k/v keep only the read input columns,
o_proj only the written output rows, gate/up and down_proj likewise. What remains at run time is one ``index_select``
on each sub-block's normed input and one ``index_add`` of each sub-block's output into a full-width zero tensor
(which the block then adds to the residual as usual). Both are forward hooks on the norms and on the attention / MLP
modules, so every module keeps its class and its name (checkpoint keys, PEFT target names and ``generate`` work as
before).

The kept indices live in a small child module of the block, ``residual_dims``, as persistent int64 buffers: they are
saved in the checkpoint next to the weights whose rows and columns they name (the record keeps only the counts, so
``config.json`` stays small whatever the width), and loading fills them like any weight.

:func:`masked_residual` runs the *unpruned* model with 0/1 (or soft) masks at the same five places (the four residual
points and the MLP channels): what a method trains against, and what the surgery is tested to equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..architectures import ArchitectureAdapter, ResidualDims
from .edits import RESIDUAL_POINTS

#: name of the child module holding the kept indices in a residual-pruned block
RESIDUAL_MODULE = "residual_dims"
#: the fifth selection DISP-LLM learns per block, besides the four residual points
MLP_CHANNELS = "mlp_channels"


def _submodule(block: nn.Module, name: str) -> nn.Module:
    module = block
    for part in name.split("."):
        module = getattr(module, part)
    return module


class KeptResidualDims(nn.Module):
    """The residual dimensions one block reads and writes: a persistent int64 buffer per selected point of
    :data:`~hf_sparse.surgery.edits.RESIDUAL_POINTS` (a point that keeps every dimension has none)."""

    def __init__(self, hidden_size: int, kept: Mapping[str, torch.Tensor]):
        super().__init__()
        self.hidden_size = int(hidden_size)
        for point in RESIDUAL_POINTS:
            if point in kept:
                self.register_buffer(point, kept[point].to(torch.int64))

    def indices(self, point: str) -> torch.Tensor | None:
        return getattr(self, point, None) if point in self._buffers else None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, " + ", ".join(
            f"{p}={self._buffers[p].numel()}" for p in RESIDUAL_POINTS if p in self._buffers)


class _SelectDims:
    """Forward hook of a norm: keep only the dimensions its sub-block reads."""

    def __init__(self, dims: KeptResidualDims, point: str):
        self.dims, self.point = dims, point

    def __call__(self, _module, _args, output: torch.Tensor) -> torch.Tensor:
        return output.index_select(-1, self.dims.indices(self.point))


class _ScatterDims:
    """Forward hook of a sub-block: put its narrow output back at the dimensions it writes, zeros elsewhere."""

    def __init__(self, dims: KeptResidualDims, point: str):
        self.dims, self.point = dims, point

    def __call__(self, _module, _args, output):
        narrow = output[0] if isinstance(output, tuple) else output  # (..., kept)
        # In place on the fresh zeros: one full-width tensor instead of two. Autograd allows it (the zeros are not
        # an input of anything), so LoRA training through the hook still gets its gradients.
        full = narrow.new_zeros(*narrow.shape[:-1], self.dims.hidden_size)
        full.index_add_(-1, self.dims.indices(self.point), narrow)
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _hook_sites(decl: ResidualDims) -> dict[str, tuple[str, type]]:
    return {"attention_input": (decl.attention_norm, _SelectDims), "attention_output": (decl.attention, _ScatterDims),
            "mlp_input": (decl.mlp_norm, _SelectDims), "mlp_output": (decl.mlp, _ScatterDims)}


def install_residual_dims(block: nn.Module, decl: ResidualDims, hidden_size: int,
                          kept: Mapping[str, torch.Tensor]) -> KeptResidualDims:
    """Give ``block`` its ``residual_dims`` module holding ``kept`` (point -> indices) and the hooks that use it.
    The linears must already have the matching rows and columns (see :func:`hf_sparse.surgery.apply_edits`)."""
    if RESIDUAL_MODULE in block._modules:
        raise ValueError("this block already reads and writes selected residual dimensions; prune the dense model")
    dims = KeptResidualDims(hidden_size, kept)
    block.add_module(RESIDUAL_MODULE, dims)
    for point, (name, hook) in _hook_sites(decl).items():
        if point in kept:
            _submodule(block, name).register_forward_hook(hook(dims, point))
    return dims


def residual_widths(block: nn.Module) -> dict[str, int] | None:
    """How many residual dimensions ``block`` reads and writes at each point, or ``None`` for a full-width block."""
    dims = block._modules.get(RESIDUAL_MODULE)
    if dims is None:
        return None
    return {p: (dims.indices(p).numel() if dims.indices(p) is not None else dims.hidden_size) for p in RESIDUAL_POINTS}


@contextlib.contextmanager
def masked_residual(model: nn.Module, adapter: ArchitectureAdapter,
                    masks: Mapping[int, Mapping[str, torch.Tensor]],
                    fills: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> Iterator[None]:
    """Run the full-width ``model`` as if block ``i`` kept only the dimensions where ``masks[i][point]`` is nonzero.

    ``masks[i]`` maps points of :data:`~hf_sparse.surgery.edits.RESIDUAL_POINTS` to ``(hidden,)`` vectors and
    ``"mlp_channels"`` to an ``(intermediate,)`` vector; missing points keep everything. The vectors multiply the
    normed input of the attention block / MLP, their outputs, and the input of the MLP's output projection, so soft
    masks pass gradients to whatever produced them. With 0/1 masks this equals applying the matching edits
    (tested). ``fills[i][point]`` (same shapes) is the value a masked-out entry takes instead of 0, ``x·m + (1 -
    m)·fill``: a constant input in place of a cut one is what a compensation bias on the reading linear adds, so
    with the dense means as fills this equals the edits with bias compensation (tested). Nothing in the model
    changes; the hooks are removed on exit.

    >>> with masked_residual(model, adapter, {0: {"attention_input": keep}}):  # doctest: +SKIP
    ...     loss = model(ids, labels=ids).loss
    """
    model_type = getattr(model.config, "model_type", None)
    decl = adapter.structure("residual_dims", model_type)
    channels = adapter.structure("mlp_channels", model_type)
    blocks = adapter.blocks(model)
    handles = []

    def masked(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        mask = mask.to(x.dtype)
        return x * mask if fill is None else x * mask + (1 - mask) * fill.to(device=x.device, dtype=x.dtype)

    def output_hook(mask: torch.Tensor, fill: torch.Tensor | None):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (masked(output[0], mask, fill), *output[1:])
            return masked(output, mask, fill)
        return hook

    try:
        for index, block_masks in masks.items():
            block, block_fills = blocks[index], (fills or {}).get(index, {})
            for point, (name, _hook) in _hook_sites(decl).items():
                if point in block_masks:
                    handles.append(_submodule(block, name).register_forward_hook(
                        output_hook(block_masks[point], block_fills.get(point))))
            if MLP_CHANNELS in block_masks:
                mask, fill = block_masks[MLP_CHANNELS], block_fills.get(MLP_CHANNELS)
                handles.append(_submodule(block, channels.output).register_forward_pre_hook(
                    lambda _m, args, mask=mask, fill=fill: (masked(args[0], mask, fill), *args[1:])))
        yield
    finally:
        for handle in handles:
            handle.remove()
