"""Devices and weights: where a block computes, and every read and write of a pruned parameter.

Blocks dispatched by accelerate (``device_map``, CPU or disk offload) keep their real weights in an offload store
and a placeholder on the ``meta`` device in the module; everything that reads or writes a parameter goes through
this module so that the store, not the placeholder, is what is read and changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _has_offload(module: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def _dispatched(block: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in block.modules())


def check_device_available(device: str | None) -> None:
    """Raise before any work if ``device`` names an accelerator this machine does not have.

    >>> check_device_available("cpu")
    """
    if device is None:
        return
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use device='cpu' or "
                         "leave device unset (first GPU if there is one, else where the model is)")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")


def execution_device(block: nn.Module, requested: str | None) -> torch.device:
    """Where ``block`` computes: a requested device, the block's accelerate execution device, the first GPU, or
    the device its weights are on.

    >>> execution_device(torch.nn.Linear(2, 2), "cpu")
    device(type='cpu')
    """
    if requested is not None:
        return torch.device(requested)
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    for param in block.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids must be: the device of its input embeddings (CPU if they are offloaded)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings.weight.device.type != "meta" else torch.device("cpu")


@contextlib.contextmanager
def block_on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Move a plain block to ``device`` for the duration, then back. Blocks dispatched by accelerate already
    compute on their execution device through their hooks and are left alone.

    >>> with block_on_device(torch.nn.Linear(2, 2), torch.device("cpu")):
    ...     pass
    """
    if _dispatched(block):
        yield
        return
    original = next(block.parameters()).device
    moved = original != device
    if moved:
        block.to(device)
    try:
        yield
    finally:
        if moved:
            block.to(original)


@contextlib.contextmanager
def readable_weight(module: nn.Linear, device: torch.device) -> Iterator[torch.Tensor]:
    """The module's weight as a real tensor on ``device`` (onloading it if accelerate offloaded it).

    >>> with readable_weight(torch.nn.Linear(3, 2), torch.device("cpu")) as weight:
    ...     tuple(weight.shape)
    (2, 3)
    """
    if _has_offload(module):
        from accelerate.utils import align_module_device

        with align_module_device(module, device):
            yield module.weight.data
    else:
        yield module.weight.data


def weight_copy(module: nn.Linear) -> torch.Tensor:
    """A detached copy of the module's weight as it is now (kept as the dense weight while the module is pruned)."""
    return module.weight.detach().clone()


def write_weight(module: nn.Linear, new_weight: torch.Tensor) -> None:
    """Replace the module's weight values, including the offloaded copy accelerate reloads before each forward.

    >>> layer = torch.nn.Linear(2, 2); write_weight(layer, torch.zeros(2, 2)); layer.weight.abs().sum().item()
    0.0
    """
    if _has_offload(module):
        stored = module._hf_hook.weights_map["weight"]
        stored.copy_(new_weight.to(device=stored.device, dtype=stored.dtype))
    if module.weight.device.type != "meta":
        module.weight.data.copy_(new_weight.to(device=module.weight.device, dtype=module.weight.dtype))
