"""What a decoder block receives and what it gives: capturing the first block's calibration inputs, and running a
block on them (with its own weights or, for one call, substitutes such as the dense weights)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .devices import input_device, offloaded_weights_replaced


class StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed from it was seen."""


@dataclass
class BlockInputs:
    """The calibration inputs of one decoder block, one entry per calibration batch.

    >>> inputs = BlockInputs([torch.zeros(2, 4, 8)], [()], [{}])
    >>> [one.hidden_states[0].shape[0] for one in inputs.batches()]
    [2]
    """

    hidden_states: list[torch.Tensor]  # each (batch, seq, hidden)
    extra_args: list[tuple]  # positional arguments after hidden_states
    kwargs: list[dict]  # attention mask, rotary embeddings, ... of the block these inputs are for
    # Every block's own keyword inputs, when the model does not give all blocks the same ones (sliding-window and
    # full-attention layers with their own masks and rotary embeddings: Gemma 2/3, Qwen with sliding windows);
    # None when they are alike, and ``kwargs`` then serves every block.
    block_kwargs: list[list[dict]] | None = None

    def with_hidden_states(self, hidden_states: list[torch.Tensor]) -> BlockInputs:
        return dataclasses.replace(self, hidden_states=hidden_states)

    def for_block(self, index: int) -> BlockInputs:
        """These inputs with block ``index``'s own keyword inputs."""
        return self if self.block_kwargs is None else dataclasses.replace(self, kwargs=self.block_kwargs[index])

    def to(self, device: torch.device) -> BlockInputs:
        # Only the current block's keyword inputs move; the other blocks' move when their turn comes.
        return BlockInputs(
            [h.to(device) for h in self.hidden_states],
            [tuple(to_device(a, device) for a in args) for args in self.extra_args],
            [{k: to_device(v, device) for k, v in kw.items()} for kw in self.kwargs],
            self.block_kwargs,
        )

    def batches(self) -> Iterator[BlockInputs]:
        """One :class:`BlockInputs` per calibration batch, in order (statistics are taken batch by batch)."""
        for i in range(len(self.hidden_states)):
            yield BlockInputs(self.hidden_states[i : i + 1], self.extra_args[i : i + 1], self.kwargs[i : i + 1])

    def token_count(self) -> int:
        """Calibration tokens over all batches."""
        return sum(h.shape[:-1].numel() for h in self.hidden_states)


def to_device(value, device: torch.device):
    """``value`` on ``device`` if it is a tensor (or a tuple of them, like rotary embeddings); else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _blocks_get_different_inputs(model: nn.Module, num_blocks: int) -> bool:
    """Whether the model hands its blocks different masks/rotary embeddings: it declares per-layer attention types
    (``config.layer_types``, e.g. sliding-window and full attention) and they are not all the same."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    return bool(layer_types) and len(set(layer_types[:num_blocks])) > 1


def _block_kwargs(kwargs: dict, device: torch.device) -> dict:
    kwargs = {k: to_device(v, device) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return kwargs


def _pass_through(*args, **kwargs):
    """A block's forward during input capture: hand the hidden states on without computing anything."""
    return args[0] if args else kwargs["hidden_states"]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device, blocks: list[nn.Module] | None = None) -> BlockInputs:
    """Run the model up to its first decoder block on every calibration batch and keep what the block receives.

    Given all ``blocks``, and when the model gives them different keyword inputs (see
    :func:`_blocks_get_different_inputs`), each block's own are kept too (``BlockInputs.block_kwargs``): the
    forward then runs through every block with the blocks computing nothing, which costs about an embedding lookup.

    >>> inputs = capture_block_inputs(model, model.model.layers[0], ids, 8, torch.device("cpu"))  # doctest: +SKIP
    """
    captured = BlockInputs([], [], [])
    per_block = blocks is not None and len(blocks) > 1 and _blocks_get_different_inputs(model, len(blocks))
    watched = list(blocks) if per_block else [first_block]
    if per_block:
        captured.block_kwargs = [[] for _ in watched]

    def catch_for(index: int):
        def catch(_module, args, kwargs):
            if args:
                hidden, extra = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, extra = kwargs.pop("hidden_states"), ()
            if index == 0:
                captured.hidden_states.append(hidden.detach().to(device))
                captured.extra_args.append(tuple(to_device(a, device) for a in extra))
                captured.kwargs.append(_block_kwargs(kwargs, device))
            if per_block:
                # The later blocks' stay where the model made them; BlockInputs.to moves them when their turn comes.
                own = captured.kwargs[-1] if index == 0 else _block_kwargs(kwargs, hidden.device)
                captured.block_kwargs[index].append(own)
            if index == len(watched) - 1:
                raise StopForward
        return catch

    embedding_device = input_device(model)
    handles = [block.register_forward_pre_hook(catch_for(i), with_kwargs=True) for i, block in enumerate(watched)]
    # An instance-level forward (accelerate's hooks put one there) is put back exactly as it was.
    own_forwards = [block.__dict__.get("forward") for block in watched[:-1]]
    for block in watched[:-1]:
        block.forward = _pass_through
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(embedding_device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(watched[:-1], own_forwards):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, weights: dict[str, torch.Tensor] | None = None
              ) -> list[torch.Tensor]:
    """Forward every calibration batch through ``block``; ``weights`` temporarily replaces parameters (by name
    relative to the block) for this call only. Returns the block outputs (empty where a hook raised
    :class:`StopForward` to end a pass early).

    >>> outputs = run_block(model.model.layers[0], inputs)  # doctest: +SKIP
    """
    outputs = []
    with torch.no_grad(), offloaded_weights_replaced(block, weights) as weights:
        for hidden, extra, kwargs in zip(inputs.hidden_states, inputs.extra_args, inputs.kwargs):
            try:
                if weights:
                    out = torch.func.functional_call(block, weights, (hidden, *extra), kwargs, strict=False)
                else:
                    out = block(hidden, *extra, **kwargs)
                outputs.append(_first_output(out))
            except StopForward:
                pass
    return outputs
