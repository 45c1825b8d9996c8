"""The layer-by-layer engine, written once and shared by every pruning method: pruning one block, and running the
pipeline that schedules the blocks.

For each decoder block of the plan:

1. take the block's inputs (captured at the first block, then the previous block's outputs);
2. for each group of linear operators (all of them at once, or one execution-order group at a time for methods
   with intra-block error correction), run the block with hooks that accumulate the statistics the method asked
   for (:mod:`hf_sparse.engine.statistics`);
3. ask the method for each operator's pruned weight and keep-mask, and write them back
   (:mod:`hf_sparse.engine.devices`);
4. compute the block's outputs, with pruned weights or, for methods that want it, dense weights, as the next
   block's inputs.

Only one block's activations and statistics are alive at a time. The order of the blocks (in order, in threads, in
several processes, or without data) is the pipeline's (:mod:`hf_sparse.engine.pipelines`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..masks import SparsityPattern
from .capture import BlockInputs, run_block
from .devices import (
    block_on_device,
    check_device_available,
    execution_device,
    readable_weight,
    weight_copy,
    write_weight,
)
from .pipelines import Pipeline, first_block_inputs, infer_pipeline
from .planning import PruningPlan, PruningTarget, TargetSparsity, plan_targets
from .protocol import MethodProtocol
from .statistics import (
    STATISTICS,
    DenseInputCache,
    DenseSource,
    LinearStatistics,
    Reads,
    StatisticsCollector,
    needs_dense_block,
)


def _reading_dense_outputs(needs_of: dict[str, frozenset[str]]) -> set[str]:
    """The operators with a statistic of their own dense output paired with X̂ (their W·X must be kept)."""
    return {name for name, needs in needs_of.items()
            if any(STATISTICS[n].reads is Reads.INPUT_AND_DENSE_OUTPUT for n in needs)}


@dataclass
class EngineResult:
    """What the engine did: zero count and size of every pruned module, in pruning order; for structured methods
    (nothing masked, no counts) the shape record of :func:`hf_sparse.surgery.describe_structure` instead."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (zeros, numel)
    structure: dict | None = None

    @property
    def achieved(self) -> dict[str, float]:
        """Achieved sparsity per pruned module."""
        return {name: zeros / numel for name, (zeros, numel) in self.counts.items()}

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all pruned weights together."""
        zeros = sum(z for z, _ in self.counts.values())
        return zeros / max(1, sum(n for _, n in self.counts.values()))


@dataclass
class BlockResult:
    """What pruning one block gave: ``(zeros, numel)`` per operator, and the block's dense outputs when a dense pass
    over the whole block was run anyway (so dense-propagating methods need not run it again)."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_outputs: list[torch.Tensor] | None = None


#: Largest cache of a block's dense operator inputs (see :class:`DenseInputCache`); above it every operator group
#: reruns the dense block instead, which is slower but needs no memory beyond one batch.
DENSE_CACHE_BYTES = 4 * 2**30


class LayerwiseEngine:
    """Prunes a model block by block with one pruning method (:class:`~hf_sparse.methods.PruningMethod`).

    ``sparsity`` is the target sparsity of every module: one number, a ``{module name: sparsity}`` mapping, a
    function of the module name, or a :class:`TargetSparsity`.

    >>> engine = LayerwiseEngine(method, SparsityPattern.parse("2:4"), 0.5)  # doctest: +SKIP
    >>> engine.run(model, calibration_ids, batch_size=8)  # doctest: +SKIP
    """

    def __init__(self, method: MethodProtocol, pattern: SparsityPattern,
                 sparsity: TargetSparsity | float | Mapping[str, float] | Callable[[str], float],
                 include: list[str] | None = None, exclude: list[str] | None = None, device: str | None = None,
                 parallel: bool = False, num_workers: int | None = None, show_progress: bool = True,
                 dense_cache_bytes: int = DENSE_CACHE_BYTES):
        self.method = method
        self.pattern = pattern
        self.sparsity = TargetSparsity.coerce(sparsity)
        self.include = include
        self.exclude = exclude
        self.device = device
        self.parallel = parallel
        self.num_workers = num_workers
        self.show_progress = show_progress
        self.dense_cache_bytes = dense_cache_bytes
        check_device_available(device)
        if parallel and not method.propagate_dense:
            raise ValueError(
                f"parallel=True needs blocks that are independent of each other; method {method.name!r} feeds each "
                "block the outputs of the already-pruned blocks, so its blocks must run in order"
            )

    def plan(self, model: nn.Module) -> PruningPlan:
        """What this engine would prune in ``model``, and to which sparsity (checked, nothing changed)."""
        return plan_targets(model, self.include, self.exclude, self.pattern, self.sparsity,
                            sequential_within_block=self.method.sequential_within_block)

    def pipeline(self) -> Pipeline:
        """The scheduler of the blocks, chosen by what the method declares (and ``parallel``)."""
        return infer_pipeline(self.method, self.parallel)(self)

    # -- per operator -------------------------------------------------------------------------------------------
    def _prune_target(self, target: PruningTarget, stats: LinearStatistics | None,
                      device: torch.device) -> tuple[int, int]:
        with readable_weight(target.module, device) as weight:
            original_dtype = weight.dtype
            work = weight.to(device, torch.float32)
            if work is weight:  # already float32 on the device: the method still gets a copy of its own
                work = work.clone()
            new_weight, mask = self.method.prune_weight(work, stats, self.pattern, target.sparsity)
            # Methods without a weight update hand back the engine's own copy: mask it in place rather than allocate
            # another full matrix (on a 135M model the copies cost as much as the N:M selection itself).
            # masked_fill, not a product with the mask: a negative weight times 0 is -0.0, and pruned weights should
            # be +0.0 bit for bit (compact checkpoints store no signs of zeros and must reload identical bytes).
            final = (new_weight.masked_fill_(~mask, 0.0) if new_weight is work
                     else new_weight.masked_fill(~mask, 0.0)).to(original_dtype)
            write_weight(target.module, final)
        return final.numel() - int(torch.count_nonzero(final)), final.numel()

    # -- per block ----------------------------------------------------------------------------------------------
    def prune_block(self, block: nn.Module, groups: list[list[PruningTarget]], inputs: BlockInputs | None,
                    device: torch.device, dense_weights: dict[str, torch.Tensor] | None = None) -> BlockResult:
        """Prune one block in place. ``dense_weights`` (the block's unpruned target weights, see
        :meth:`dense_weights`) is needed by methods that collect a statistic of the dense block."""
        result = BlockResult()
        needs = self.method.statistics
        needs_of = {t.name: self._statistics_for(t) for group in groups for t in group}
        dense, cache = DenseSource.RECOMPUTE, None
        cached = self._dense_cache_targets(groups, inputs, needs_of) if needs_dense_block(needs) else []
        if cached:
            output_statistics = [STATISTICS[n] for n in sorted(needs) if STATISTICS[n].reads is Reads.DENSE_OUTPUT]
            cache = DenseInputCache(block, cached, inputs, dense_weights, device, output_statistics,
                                    keep_outputs=_reading_dense_outputs(needs_of))
            dense = DenseSource.CACHED
            result.dense_outputs = cache.outputs
        # The first group reads the cache too when it holds its inputs: nothing is pruned yet, so they are its X̂.
        first_from_cache = cache if cache is not None and cached[0] is groups[0][0] else None
        for index, group in enumerate(groups):
            stats = {}
            if needs:
                # Nothing of this block is pruned before its first group: there X̂ is X.
                group_needs = {t.name: needs_of[t.name] for t in group}
                collector = (StatisticsCollector(group, group_needs, device, DenseSource.SAME, first_from_cache)
                             if index == 0 else StatisticsCollector(group, group_needs, device, dense, cache))
                collector.collect(block, inputs, dense_weights)
                stats = collector.stats
            for target in group:
                result.counts[target.name] = self._prune_target(target, stats.get(target.name), device)
            del stats
            if cache is not None:
                cache.release(group)
        return result

    def _statistics_for(self, target: PruningTarget) -> frozenset[str]:
        needs = frozenset(self.method.statistics_for(target.module))
        if not needs <= self.method.statistics:
            raise ValueError(f"{type(self.method).__name__}.statistics_for({target.name!r}) names "
                             f"{sorted(needs - self.method.statistics)}, which its `statistics` "
                             f"{sorted(self.method.statistics)} does not list")
        return needs

    def _dense_cache_targets(self, groups: list[list[PruningTarget]], inputs: BlockInputs | None,
                             needs_of: dict[str, frozenset[str]]) -> list[PruningTarget]:
        """The operators whose dense inputs one dense pass should cache: every group's if they fit
        ``dense_cache_bytes`` (the first group's statistics are then read from the cache, with no pass of their
        own), else the later groups' (the first group's own pass sees X anyway), else none (only one group, or too
        big: each later group reruns the dense block)."""
        everything = [t for group in groups for t in group]
        later = everything[len(groups[0]):] if groups else []
        if not later:
            return []
        keep = _reading_dense_outputs(needs_of)
        for targets in (everything, later):
            if DenseInputCache.size_bound(targets, inputs, keep) <= self.dense_cache_bytes:
                return targets
        return []

    def dense_weights(self, block: nn.Module, targets: list[PruningTarget]) -> dict[str, torch.Tensor] | None:
        """The unpruned weights of ``targets`` by name relative to ``block``, if the method will read the dense
        block (dense propagation or a dense statistic); else ``None``."""
        if not (self.method.propagate_dense or needs_dense_block(self.method.statistics)):
            return None
        modules = {id(t.module) for t in targets}
        device = execution_device(block, self.device)
        return {f"{rel}.weight": weight_copy(module, device)
                for rel, module in block.named_modules() if id(module) in modules}

    # -- whole model --------------------------------------------------------------------------------------------
    def summarize_dense_blocks(self, model: nn.Module, calibration_ids: torch.Tensor, batch_size: int,
                               statistics: frozenset[str],
                               summarize: Callable[[list[tuple[PruningTarget, torch.Tensor, LinearStatistics]]], Any],
                               description: str = "dense statistics") -> list[Any]:
        """One pass over the *dense* model before pruning: for each block of the plan, in order, the registered
        ``statistics`` of its targets (fed the dense previous blocks' outputs) are collected and handed to
        ``summarize`` as ``(target, weight, stats)`` triples; its return value, one per block, is kept and the
        statistics are dropped. Nothing is changed, and only one block's activations and statistics are alive at a
        time, as in pruning. Sparsity profiles (OWL) read their outlier statistics this way.

        >>> engine.summarize_dense_blocks(model, ids, 8, frozenset({"sq_norm"}), len)  # doctest: +SKIP
        [7, 7, 7, 7, 7, 7]
        """
        plan = self.plan(model)
        inputs = first_block_inputs(model, plan, calibration_ids, batch_size, self.device)
        summaries = []
        last = len(plan.blocks) - 1
        for block_plan in tqdm(plan.blocks, desc=description, unit="block", disable=not self.show_progress):
            device = execution_device(block_plan.block, self.device)
            inputs = inputs.for_block(block_plan.index).to(device)
            with block_on_device(block_plan.block, device):
                if block_plan.targets:
                    collector = StatisticsCollector(block_plan.targets, statistics, device)
                    collector.collect(block_plan.block, inputs, None)
                    with contextlib.ExitStack() as stack:
                        triples = [(t, stack.enter_context(readable_weight(t.module, device)).float(),
                                    collector.stats[t.name]) for t in block_plan.targets]
                        summaries.append(summarize(triples))
                    del collector, triples
                else:
                    summaries.append(None)
                if block_plan.index != last:
                    inputs = inputs.with_hidden_states(run_block(block_plan.block, inputs))
        return summaries

    def run(self, model: nn.Module, calibration_ids: torch.Tensor | None, batch_size: int = 8) -> EngineResult:
        """Prune ``model`` in place. ``calibration_ids`` (samples, seq) may be ``None`` for data-free methods."""
        pipeline = self.pipeline()
        if pipeline.needs_calibration and calibration_ids is None:
            raise ValueError(f"method {self.method.name!r} needs calibration data")
        if pipeline.edits_structure:  # whole structures go: no plan of linears; the method shows its own progress
            pipeline.run(model, None, calibration_ids, batch_size, None)
            return EngineResult(structure=pipeline.structure)
        plan = self.plan(model)
        progress = tqdm(total=len(plan.blocks), desc=f"pruning ({self.method.name}, {self.pattern})", unit="block",
                        disable=not self.show_progress)
        try:
            return EngineResult(pipeline.run(model, plan, calibration_ids, batch_size, progress))
        finally:
            progress.close()
