"""Devices and weights: where a block computes, and every read and write of a pruned parameter.

Blocks dispatched by accelerate (``device_map``, CPU or disk offload) keep their real weights in an offload store
and a placeholder on the ``meta`` device in the module; everything that reads or writes a parameter goes through
this module so that the store, not the placeholder, is what is read and changed. A weight kept in CPU memory is
changed in place; a weight on disk (a memory-mapped file of the offload folder, or the checkpoint's own safetensors
file, which is never written to) is replaced by a new file in the offload folder that the store then reads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

_WARNED_STORES: set[int] = set()  # offload stores already warned about (see _write_offloaded)


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


@contextlib.contextmanager
def offloaded_weights_replaced(block: nn.Module, weights: dict[str, torch.Tensor] | None
                               ) -> Iterator[dict[str, torch.Tensor]]:
    """For the duration, accelerate loads ``weights`` (by name relative to ``block``) instead of the stored values of
    offloaded modules; yields the other entries, for the caller to substitute itself (``torch.func.functional_call``,
    which accelerate's hooks would override on an offloaded module, since they load each weight before its forward).

    >>> with offloaded_weights_replaced(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"0.weight": torch.eye(2)}) as rest:
    ...     sorted(rest)
    ['0.weight']
    """
    if not weights:
        yield {}
        return
    modules = dict(block.named_modules())
    remaining, replaced = {}, []
    for full_name, value in weights.items():
        module_name, _, name = full_name.rpartition(".")
        module = modules[module_name]
        if _has_offload(module):
            replaced.append((module, module._hf_hook.weights_map))
            module._hf_hook.weights_map = _Overlay(module._hf_hook.weights_map, {name: value})
        else:
            remaining[full_name] = value
    try:
        yield remaining
    finally:
        for module, original in reversed(replaced):
            module._hf_hook.weights_map = original


class _Overlay(Mapping):
    """A weights map that answers some keys itself and leaves the others to the map it covers."""

    def __init__(self, base: Mapping, values: dict[str, torch.Tensor]):
        self.base, self.values = base, values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key] if key in self.values else self.base[key]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def weight_copy(module: nn.Linear, device: torch.device | None = None) -> torch.Tensor:
    """A detached copy of the module's weight as it is now (kept as the dense weight while the module is pruned);
    an offloaded weight is read from its store onto ``device`` (default: the CPU)."""
    with readable_weight(module, device or torch.device("cpu")) as weight:
        return weight.detach().clone()


def write_weight(module: nn.Linear, new_weight: torch.Tensor) -> None:
    """Replace the module's weight values, including the offloaded copy accelerate reloads before each forward.

    >>> layer = torch.nn.Linear(2, 2); write_weight(layer, torch.zeros(2, 2)); layer.weight.abs().sum().item()
    0.0
    """
    write_parameter(module, "weight", new_weight)


def write_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the parameter ``name`` of ``module`` (its own, not of a submodule), wherever it lives: in the
    module, or in accelerate's offload store (CPU memory, or disk), so that later forward passes, ``state_dict``,
    ``save_pretrained`` and :func:`readable_weight` all see it. Values of the same shape are copied into the
    existing storage; a new shape replaces the parameter (and its offloaded copy).

    >>> layer = torch.nn.Linear(4, 2); write_parameter(layer, "weight", torch.ones(2, 3)); tuple(layer.weight.shape)
    (2, 3)
    """
    value = value.detach()
    current = module._parameters[name]
    if _has_offload(module):
        _write_offloaded(module, name, value.to(current.dtype))
    if current.device.type == "meta":
        if current.shape != value.shape:
            # The placeholder must have the new shape: accelerate refuses to load a value of another shape into it.
            module._parameters[name] = nn.Parameter(torch.empty(value.shape, dtype=current.dtype, device="meta"),
                                                    requires_grad=current.requires_grad)
    elif current.shape == value.shape:
        current.data.copy_(value.to(device=current.device, dtype=current.dtype))
    else:
        module._parameters[name] = nn.Parameter(value.to(device=current.device, dtype=current.dtype).clone(),
                                                requires_grad=current.requires_grad)


def _offload_store(module: nn.Module, name: str):
    """The mapping accelerate reloads ``module.<name>`` from before each forward, unwrapped from its key prefixes,
    and the key in it."""
    from accelerate.utils import PrefixedDataset

    store, key = module._hf_hook.weights_map, name
    while isinstance(store, PrefixedDataset):
        store, key = store.dataset, store.prefix + key
    return store, key


def _write_offloaded(module: nn.Module, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    store, key = _offload_store(module, name)
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        # The weight is read from disk at every forward: from a memory-mapped file in the offload folder or straight
        # from the checkpoint's safetensors file, which must never be modified. Either way a new file in the offload
        # folder takes its place in the loader's index (so the store stays on disk).
        if store.save_folder is not None:
            offload_weight(value.cpu(), key, store.save_folder, index=store.index)
            return
        # No offload folder to write to (transformers reads a safetensors checkpoint in place without one): keep the
        # values in CPU memory, which the loader reads first.
        if id(store) not in _WARNED_STORES:
            _WARNED_STORES.add(id(store))
            logger.warning("pruned weights of disk-offloaded modules are kept in CPU memory: no offload folder was "
                           "given to write them to (pass offload_folder=... to from_pretrained to keep them on disk)")
        store.state_dict[key] = value.cpu().clone()
        return
    mapping = store.state_dict if isinstance(store, OffloadedWeightsLoader) else store
    stored = mapping[key]
    if stored.shape == value.shape:
        stored.copy_(value.to(device=stored.device, dtype=stored.dtype))
    else:
        mapping[key] = value.to(device=stored.device, dtype=stored.dtype).clone()
