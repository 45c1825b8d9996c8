"""Pipelines: how the blocks of a plan are scheduled. Each is registered by name behind one interface, and
:func:`infer_pipeline` picks one from what the method declares:

- ``data_free``: the method needs no calibration (``statistics`` is empty): every block is pruned on its weights;
- ``sequential``: blocks in order, each on the outputs of the previous one (pruned, or dense for methods that
  ``propagate_dense``);
- ``threaded``: dense-propagating methods with ``parallel=True``: blocks are independent, pruned in worker threads;
- ``distributed``: the same under ``torchrun``/``accelerate launch``: one process per device prunes its share of
  the blocks, and the pruned weights are shared (:mod:`hf_sparse.engine.distributed`);
- ``structured``: methods that declare ``edits_structure`` (FLAP, ShortGPT, SLEB, PIP) remove whole heads, channels
  or blocks: the method decides on the dense model (:class:`~hf_sparse.engine.structured.StructuredSession`), the
  surgery applies its edits once (:func:`~hf_sparse.engine.structured.run_structured`), and the result is the shape
  record rather than masks.

A new schedule is a :class:`Pipeline` subclass decorated with :func:`register_pipeline`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from . import distributed
from .capture import BlockInputs, capture_block_inputs, run_block
from .devices import block_on_device, execution_device, readable_weight, write_weight
from .planning import PruningPlan
from .protocol import MethodProtocol

if TYPE_CHECKING:
    from .layerwise import LayerwiseEngine

Counts = dict[str, tuple[int, int]]  # module name -> (zeros, numel)


class Pipeline(ABC):
    """One way of scheduling the blocks of a plan; prunes through the engine's :meth:`LayerwiseEngine.prune_block`."""

    name: ClassVar[str]
    #: the pipeline reads calibration token ids (the engine refuses to start it without them)
    needs_calibration: ClassVar[bool] = True
    #: the pipeline removes whole structures: no plan of linears, no masks; its result is :attr:`structure`
    edits_structure: ClassVar[bool] = False

    def __init__(self, engine: LayerwiseEngine):
        self.engine = engine

    @abstractmethod
    def run(self, model: nn.Module, plan: PruningPlan, calibration_ids: torch.Tensor | None, batch_size: int,
            progress) -> Counts:
        """Prune every block of ``plan`` in ``model``; returns ``(zeros, numel)`` per pruned module, in plan order.
        ``progress`` (a tqdm bar) advances by one per block."""

    def _first_block_inputs(self, model: nn.Module, plan: PruningPlan, calibration_ids: torch.Tensor,
                            batch_size: int) -> BlockInputs:
        return first_block_inputs(model, plan, calibration_ids, batch_size, self.engine.device)


def first_block_inputs(model: nn.Module, plan: PruningPlan, calibration_ids: torch.Tensor, batch_size: int,
                       device: str | None) -> BlockInputs:
    """The calibration inputs of the plan's first block (and, where the model gives blocks different keyword inputs,
    each block's own), captured on the device the first block computes on."""
    first = plan.blocks[0].block
    target = execution_device(first, device)
    with block_on_device(first, target):
        return capture_block_inputs(model, first, calibration_ids, batch_size, target,
                                    blocks=[block_plan.block for block_plan in plan.blocks])


def advance(progress, block_plan, achieved: Counts) -> None:
    """One block done: the bar shows which block and the sparsity reached so far over what it counts."""
    zeros = sum(z for z, _ in achieved.values())
    numel = sum(n for _, n in achieved.values())
    progress.set_postfix(block=block_plan.index, sparsity=f"{zeros / max(1, numel):.4f}", refresh=False)
    progress.update()


#: Every pipeline, by name.
PIPELINES: dict[str, type[Pipeline]] = {}


def register_pipeline(name: str) -> Callable[[type[Pipeline]], type[Pipeline]]:
    """Class decorator adding a :class:`Pipeline` subclass to :data:`PIPELINES` under ``name``."""

    def decorate(cls: type[Pipeline]) -> type[Pipeline]:
        if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
            raise TypeError(f"{cls!r} must subclass hf_sparse.engine.pipelines.Pipeline")
        if name in PIPELINES and PIPELINES[name] is not cls:
            raise ValueError(f"a pipeline named {name!r} is already registered")
        cls.name = name
        PIPELINES[name] = cls
        return cls

    return decorate


def infer_pipeline(method: MethodProtocol, parallel: bool) -> type[Pipeline]:
    """The pipeline for ``method``: data-free without statistics; with ``parallel`` (only for dense-propagating
    methods, whose blocks are independent) threads, or processes when launched with several; else in order.
    Structured methods (``edits_structure``) always take the structured pipeline."""
    if method.edits_structure:
        return PIPELINES["structured"]
    if not method.needs_calibration:
        return PIPELINES["data_free"]
    if parallel and method.propagate_dense:
        return PIPELINES["distributed" if distributed.launched_with_several_processes() else "threaded"]
    return PIPELINES["sequential"]


@register_pipeline("data_free")
class DataFreePipeline(Pipeline):
    """Every block pruned on its weights alone, in order; no forward pass."""

    needs_calibration = False

    def run(self, model, plan, calibration_ids, batch_size, progress) -> Counts:
        achieved: Counts = {}
        for block_plan in plan.blocks:
            device = execution_device(block_plan.block, self.engine.device)
            with block_on_device(block_plan.block, device):
                achieved.update(self.engine.prune_block(block_plan.block, block_plan.groups, None, device).counts)
            advance(progress, block_plan, achieved)
        return achieved


@register_pipeline("sequential")
class SequentialPipeline(Pipeline):
    """The blocks one after the other, each on the outputs of the previous one."""

    def run(self, model, plan, calibration_ids, batch_size, progress) -> Counts:
        return self.prune_in_order(plan, self._first_block_inputs(model, plan, calibration_ids, batch_size), progress)

    def prune_in_order(self, plan: PruningPlan, inputs: BlockInputs, progress, owned: set[int] | None = None
                       ) -> Counts:
        """Prune the blocks one after the other, each on the outputs of the previous one (pruned, or dense for
        dense-propagating methods). With ``owned``, only those blocks are pruned and the others merely run dense to
        reach them; nothing after the last owned block runs."""
        engine = self.engine
        achieved: Counts = {}
        last = len(plan.blocks) - 1 if owned is None else max(owned, default=-1)
        for block_plan in plan.blocks[: last + 1]:
            block, index = block_plan.block, block_plan.index
            device = execution_device(block, engine.device)
            inputs = inputs.for_block(index).to(device)
            with block_on_device(block, device):
                if owned is not None and index not in owned:
                    # Left to another process; still dense here, so running it gives the next block's dense inputs.
                    inputs = inputs.with_hidden_states(run_block(block, inputs))
                    continue
                dense = engine.dense_weights(block, block_plan.targets)
                pruned = engine.prune_block(block, block_plan.groups, inputs, device, dense)
                achieved.update(pruned.counts)
                if index == last:
                    outputs = []  # nothing reads them
                elif engine.method.propagate_dense and pruned.dense_outputs is not None:
                    outputs = pruned.dense_outputs
                else:
                    outputs = run_block(block, inputs, weights=dense if engine.method.propagate_dense else None)
                inputs = inputs.with_hidden_states(outputs)
            advance(progress, block_plan, achieved)
        return achieved


@register_pipeline("distributed")
class DistributedPipeline(SequentialPipeline):
    """One process per device: each prunes its contiguous share of the (independent) blocks in order, then every
    pruned weight is broadcast from the process that pruned it, so all processes end with the same model."""

    def run(self, model, plan, calibration_ids, batch_size, progress) -> Counts:
        # Created before anything runs: it sets up the process group and this process's GPU.
        state = distributed.process_state(self.engine.device)
        progress.disable = progress.disable or not state.is_main_process
        inputs = self._first_block_inputs(model, plan, calibration_ids, batch_size)
        owned = distributed.blocks_of_this_process(state, len(plan.blocks))
        self.prune_in_order(plan, inputs, progress, owned=set(owned))
        owners = distributed.block_owners(owned)
        achieved: Counts = {}
        for block_plan in plan.blocks:
            device = execution_device(block_plan.block, self.engine.device)
            for target in block_plan.targets:
                with readable_weight(target.module, device) as weight:
                    shared = distributed.broadcast_from(weight, owners[block_plan.index], state)
                write_weight(target.module, shared)
                achieved[target.name] = (int((shared == 0).sum().item()), shared.numel())
            if owners[block_plan.index] != state.process_index:
                progress.update()
        state.wait_for_everyone()  # nobody leaves while another process still reads a broadcast
        return achieved


@register_pipeline("threaded")
class ThreadedPipeline(Pipeline):
    """Blocks fed dense inputs are independent: cache every block's dense inputs with one dense pass, then prune
    the blocks concurrently in worker threads (torch kernels release the GIL). Same results as in order."""

    def run(self, model, plan, calibration_ids, batch_size, progress) -> Counts:
        engine = self.engine
        inputs = self._first_block_inputs(model, plan, calibration_ids, batch_size)
        per_block_inputs = []
        for block_plan in plan.blocks:
            device = execution_device(block_plan.block, engine.device)
            inputs = inputs.for_block(block_plan.index).to(device)
            per_block_inputs.append(inputs)
            with block_on_device(block_plan.block, device):
                inputs = inputs.with_hidden_states(run_block(block_plan.block, inputs))

        def work(job) -> Counts:
            block_plan, block_inputs = job
            device = execution_device(block_plan.block, engine.device)
            with block_on_device(block_plan.block, device):
                dense = engine.dense_weights(block_plan.block, block_plan.targets)
                achieved = engine.prune_block(block_plan.block, block_plan.groups, block_inputs, device, dense).counts
            advance(progress, block_plan, achieved)
            return achieved

        achieved: Counts = {}
        workers = engine.num_workers or min(len(plan.blocks), torch.get_num_threads())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(work, zip(plan.blocks, per_block_inputs)):
                achieved.update(part)
        return achieved


@register_pipeline("structured")
class StructuredPipeline(Pipeline):
    """Whole heads, channels or blocks removed: the method decides its edits on the dense model through a
    :class:`~hf_sparse.engine.structured.StructuredSession` and the surgery applies them once
    (:func:`~hf_sparse.engine.structured.run_structured`). The engine's ``sparsity`` is one number, the fraction of
    the decoder-block parameters to remove, or, from a sparsity profile, a share per block
    (:attr:`~hf_sparse.engine.planning.TargetSparsity.blocks`). Nothing is masked, so :meth:`run` returns no
    counts; the shape record is :attr:`structure` afterwards."""

    edits_structure = True

    def __init__(self, engine: LayerwiseEngine):
        super().__init__(engine)
        self.structure: dict | None = None

    def run(self, model, plan, calibration_ids, batch_size, progress) -> Counts:
        from .structured import run_structured

        engine = self.engine
        blocks = engine.sparsity.blocks
        if engine.sparsity.value is None and blocks is None:
            raise ValueError(f"structured method {engine.method.name!r} removes one fraction of the block parameters "
                             f"or, with a sparsity profile, a share of each block's; got a per-module target "
                             f"({engine.sparsity.description}) without per-block shares")
        self.structure = run_structured(model, engine.method, calibration_ids, engine.sparsity.value,
                                        batch_size=batch_size, device=engine.device,
                                        show_progress=engine.show_progress, block_targets=blocks)
        return {}
