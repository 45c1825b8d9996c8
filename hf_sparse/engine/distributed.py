"""Pruning across processes: one process per GPU (or several CPU processes), launched by ``torchrun`` (or, on GPUs,
``accelerate launch --multi_gpu``, which runs torchrun). Only the torchrun environment (``WORLD_SIZE``, ``RANK``) is
recognised: accelerate's MPI-based multi-CPU launch is not.

Methods that feed every block the dense model's activations (FISTA) make blocks independent, so each process can
prune its own contiguous share of the blocks and then receive everybody else's pruned weights. Every process ends with
the same pruned model, the model a single process would produce. The process group and the device of each process
come from accelerate's :class:`~accelerate.PartialState` (NCCL on GPUs, gloo on CPUs); this module only decides who
prunes which block and moves the results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_with_several_processes() -> bool:
    """True under ``torchrun``/``accelerate launch`` with more than one process (or an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(device: str | None = None):
    """accelerate's state of this process; creating it initialises the process group from the launcher's
    environment (NCCL on GPUs, gloo when ``device`` is ``"cpu"`` or there is no GPU) and, on GPUs, makes this
    process's GPU the current device."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes < 2:
        raise RuntimeError(
            f"launched with WORLD_SIZE={os.environ.get('WORLD_SIZE')} but accelerate set up "
            f"{state.num_processes} process(es) ({state.distributed_type}); start the script with "
            "`torchrun --nproc_per_node N` (or, on GPUs, `accelerate launch --multi_gpu --num_processes N`)"
        )
    return state


def blocks_of_this_process(state, n_blocks: int) -> list[int]:
    """This process's contiguous share of the block indices (accelerate's split: sizes differ by at most one)."""
    with state.split_between_processes(list(range(n_blocks))) as mine:
        return list(mine)


def block_owners(owned: list[int]) -> dict[int, int]:
    """Block index -> rank of the process that pruned it, agreed on by every process."""
    everyone: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, owned)
    return {index: rank for rank, indices in enumerate(everyone) for index in indices}


def broadcast_from(tensor: torch.Tensor, source_rank: int, state) -> torch.Tensor:
    """``tensor`` as held by ``source_rank``, on every process. Sent as raw bytes, so every dtype travels exactly
    (gloo has no bfloat16 reductions, and nothing here needs arithmetic)."""
    comm_device = state.device if dist.get_backend() == "nccl" else torch.device("cpu")
    payload = tensor.detach().to(comm_device).contiguous()
    raw = payload.view(-1).view(torch.uint8) if payload.element_size() > 1 else payload.view(-1)
    dist.broadcast(raw, src=source_rank)
    return payload.to(tensor.device)
