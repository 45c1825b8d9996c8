"""Optional accelerated modules: 2:4 linears on sparse tensor cores (cuSPARSELt), with the dense path kept.

    import hf_sparse.kernels
    swapped = hf_sparse.kernels.enable_2of4(model)   # opt-in; model on a CUDA GPU, fp16/bf16, 2:4-pruned
    hf_sparse.kernels.disable_2of4(model)            # back to plain nn.Linear

Each swapped linear runs the sparse kernel only for (weight shape, token count) cases a measurement found faster
(:mod:`hf_sparse.kernels.dispatch`); decode and everything unmeasured run dense. On CPU, on GPUs with compute
capability below 8.0 (no sparse tensor cores) or without cuSPARSELt, :func:`enable_2of4` refuses and changes nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..masks import is_valid_n_m
from .dispatch import H100_TABLE, DispatchTable, table_for_device
from .semi_structured import SHAPE_MULTIPLE, SPARSE_DTYPES, SemiStructuredSparseLinear

logger = logging.getLogger(__name__)

MIN_COMPUTE_CAPABILITY = (8, 0)


def check_2of4_device(device: torch.device) -> None:
    """Raise ``ValueError`` unless ``device`` can run cuSPARSELt 2:4 kernels.

    >>> check_2of4_device(torch.device("cpu"))
    Traceback (most recent call last):
    ...
    ValueError: 2:4 kernels need a CUDA GPU with compute capability >= 8.0 and cuSPARSELt; the model is on cpu. Nothing was changed: the model keeps its dense linears
    """
    keep = "Nothing was changed: the model keeps its dense linears"
    if device.type != "cuda":
        raise ValueError(f"2:4 kernels need a CUDA GPU with compute capability >= 8.0 and cuSPARSELt; the model is "
                         f"on {device}. {keep}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        raise ValueError(f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
                         f"; 2:4 sparse tensor cores need >= 8.0. {keep}")
    if not torch.backends.cusparselt.is_available():
        raise ValueError(f"this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False). "
                         f"{keep}")


def plan_2of4(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules :func:`enable_2of4` would swap: 2:4-valid weights in float16/bfloat16 whose
    dimensions are multiples of 16. Runs anywhere (no GPU needed)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if weight.dtype not in SPARSE_DTYPES or weight.shape[0] % SHAPE_MULTIPLE or weight.shape[1] % SHAPE_MULTIPLE:
            continue
        if is_valid_n_m(weight.detach(), 2, 4):
            names.append(name)
    return names


def enable_2of4(model: nn.Module, table: DispatchTable | None = None) -> list[str]:
    """Swap every 2:4-pruned ``nn.Linear`` of ``model`` for a :class:`SemiStructuredSparseLinear`; returns the names.

    ``table`` defaults to the shipped measurement for this GPU (an H100); on another GPU pass one measured with
    ``examples/benchmark_2of4.py --write-table`` (:meth:`DispatchTable.load`). Raises ``ValueError`` and changes
    nothing on CPU, below compute capability 8.0, without cuSPARSELt, without a table, or with no 2:4 linear.

    >>> swapped = hf_sparse.kernels.enable_2of4(model.to("cuda", torch.float16))  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    check_2of4_device(device)
    if table is None:
        table = table_for_device(torch.cuda.get_device_name(device))
        if table is None:
            raise ValueError(f"no measured 2:4 dispatch table for {torch.cuda.get_device_name(device)!r} (hf_sparse "
                             f"ships one for {H100_TABLE.device}); measure one with examples/benchmark_2of4.py "
                             "--write-table table.json and pass table=DispatchTable.load('table.json'). Nothing was "
                             "changed")
    names = plan_2of4(model)
    if not names:
        raise ValueError("no nn.Linear of this model holds a 2:4 float16/bfloat16 weight with dimensions divisible by "
                         f"{SHAPE_MULTIPLE}: prune with pattern='2:4' and load in float16 or bfloat16. Nothing changed")
    for name in names:
        module = SemiStructuredSparseLinear(model.get_submodule(name), table)
        module.compress()
        model.set_submodule(name, module)
    covered = sum(1 for n in names if (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
                  in table.min_tokens)
    logger.info("2:4 kernels on %d linears (%d of them with measured shapes in the %s table; the rest run dense)",
                len(names), covered, table.device)
    return names


def disable_2of4(model: nn.Module) -> list[str]:
    """Put plain ``nn.Linear`` modules back in place of every :class:`SemiStructuredSparseLinear`; returns the names.

    >>> disable_2of4(nn.Sequential(nn.Linear(4, 4)))
    []
    """
    names = [name for name, module in model.named_modules() if isinstance(module, SemiStructuredSparseLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return names


__all__ = ["DispatchTable", "H100_TABLE", "SemiStructuredSparseLinear", "check_2of4_device", "disable_2of4",
           "enable_2of4", "plan_2of4", "table_for_device"]
