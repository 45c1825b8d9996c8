"""What a decoder block receives and what it gives: capturing the first block's calibration inputs, and running a
block on them (with its own weights or, for one call, substitutes such as the dense weights)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .devices import input_device


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
    kwargs: list[dict]  # attention mask, rotary embeddings, ... (identical in every block)

    def with_hidden_states(self, hidden_states: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden_states, self.extra_args, self.kwargs)

    def to(self, device: torch.device) -> BlockInputs:
        return BlockInputs(
            [h.to(device) for h in self.hidden_states],
            [tuple(to_device(a, device) for a in args) for args in self.extra_args],
            [{k: to_device(v, device) for k, v in kw.items()} for kw in self.kwargs],
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


def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> BlockInputs:
    """Run the model up to its first decoder block on every calibration batch and keep what the block receives.

    >>> inputs = capture_block_inputs(model, model.model.layers[0], ids, 8, torch.device("cpu"))  # doctest: +SKIP
    """
    captured = BlockInputs([], [], [])

    def catch(_module, args, kwargs):
        if args:
            hidden, extra = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, extra = kwargs.pop("hidden_states"), ()
        captured.hidden_states.append(hidden.detach().to(device))
        captured.extra_args.append(tuple(to_device(a, device) for a in extra))
        kwargs = {k: to_device(v, device) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.kwargs.append(kwargs)
        raise StopForward

    embedding_device = input_device(model)
    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(embedding_device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, weights: dict[str, torch.Tensor] | None = None
              ) -> list[torch.Tensor]:
    """Forward every calibration batch through ``block``; ``weights`` temporarily replaces parameters (by name
    relative to the block) for this call only. Returns the block outputs (empty where a hook raised
    :class:`StopForward` to end a pass early).

    >>> outputs = run_block(model.model.layers[0], inputs)  # doctest: +SKIP
    """
    outputs = []
    with torch.no_grad():
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
