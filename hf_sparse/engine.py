"""The layer-by-layer calibration engine, written once and shared by every pruning method.

For each decoder block, in order:

1. take the block's inputs (captured at the first block, then the previous block's outputs);
2. for each group of linear operators (all of them at once, or one execution-order group at a time for methods
   with intra-block error correction), run the block with hooks that accumulate the statistics the method asked
   for (‖x‖², X̂X̂ᵀ, and X X̂ᵀ against the dense block);
3. ask the method for each operator's pruned weight and keep-mask, and write them back;
4. compute the block's outputs, with pruned weights or, for methods that want it, dense weights, as the next
   block's inputs.

Only one block's activations and statistics are alive at a time. A block runs on the execution device (the first
GPU if there is one) while the rest of the model stays where it was loaded; blocks dispatched by accelerate
(``device_map``, CPU offload) run where their hooks put them and pruned weights are written back to the offload
store.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import ArchitectureAdapter, get_architecture
from .masks import SparsityPattern
from .methods.base import LinearStatistics, PruningMethod

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed from it was seen."""


@dataclass
class BlockInputs:
    """The calibration inputs of one decoder block, one entry per calibration batch."""

    hidden_states: list[torch.Tensor]  # each (batch, seq, hidden)
    extra_args: list[tuple]  # positional arguments after hidden_states
    kwargs: list[dict]  # attention mask, rotary embeddings, ... (identical in every block)

    def with_hidden_states(self, hidden_states: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden_states, self.extra_args, self.kwargs)

    def to(self, device: torch.device) -> BlockInputs:
        return BlockInputs(
            [h.to(device) for h in self.hidden_states],
            [tuple(_to_device(a, device) for a in args) for args in self.extra_args],
            [{k: _to_device(v, device) for k, v in kw.items()} for kw in self.kwargs],
        )


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@dataclass
class PruningTarget:
    """One linear operator to prune: its full module name, the module, and its target sparsity."""

    name: str
    module: nn.Linear
    sparsity: float


@dataclass
class EngineResult:
    """What the engine did: zero count and size of every pruned module, in pruning order."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (zeros, numel)

    @property
    def achieved(self) -> dict[str, float]:
        """Achieved sparsity per pruned module."""
        return {name: zeros / numel for name, (zeros, numel) in self.counts.items()}

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all pruned weights together."""
        zeros = sum(z for z, _ in self.counts.values())
        return zeros / max(1, sum(n for _, n in self.counts.values()))


# ----------------------------------------------------------------------------------------------------------------
# Devices and weights


def _has_offload(module: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def _dispatched(block: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in block.modules())


def execution_device(block: nn.Module, requested: str | None) -> torch.device:
    """Where ``block`` computes: a requested device, the block's accelerate execution device, the first GPU, or
    the device its weights are on."""
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


@contextlib.contextmanager
def block_on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Move a plain block to ``device`` for the duration, then back. Blocks dispatched by accelerate already
    compute on their execution device through their hooks and are left alone."""
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
    """The module's weight as a real tensor on ``device`` (onloading it if accelerate offloaded it)."""
    if _has_offload(module):
        from accelerate.utils import align_module_device

        with align_module_device(module, device):
            yield module.weight.data
    else:
        yield module.weight.data


def write_weight(module: nn.Linear, new_weight: torch.Tensor) -> None:
    """Replace the module's weight values, including the offloaded copy accelerate reloads before each forward."""
    if _has_offload(module):
        stored = module._hf_hook.weights_map["weight"]
        stored.copy_(new_weight.to(device=stored.device, dtype=stored.dtype))
    if module.weight.device.type != "meta":
        module.weight.data.copy_(new_weight.to(device=module.weight.device, dtype=module.weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Forward passes


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> BlockInputs:
    """Run the model up to its first decoder block on every calibration batch and keep what the block receives."""
    captured = BlockInputs([], [], [])

    def catch(_module, args, kwargs):
        if args:
            hidden, extra = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, extra = kwargs.pop("hidden_states"), ()
        captured.hidden_states.append(hidden.detach().to(device))
        captured.extra_args.append(tuple(_to_device(a, device) for a in extra))
        kwargs = {k: _to_device(v, device) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.kwargs.append(kwargs)
        raise _StopForward

    embeddings = model.get_input_embeddings()
    input_device = embeddings.weight.device if embeddings.weight.device.type != "meta" else torch.device("cpu")
    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(input_device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, weights: dict[str, torch.Tensor] | None = None,
              stop_after: Callable[[], bool] | None = None) -> list[torch.Tensor]:
    """Forward every calibration batch through ``block``; ``weights`` temporarily replaces parameters (by name
    relative to the block) for this call only. Returns the block outputs (empty where ``stop_after`` ended a pass)."""
    outputs = []
    with torch.no_grad():
        for hidden, extra, kwargs in zip(inputs.hidden_states, inputs.extra_args, inputs.kwargs):
            try:
                if weights:
                    out = torch.func.functional_call(block, weights, (hidden, *extra), kwargs, strict=False)
                else:
                    out = block(hidden, *extra, **kwargs)
                outputs.append(_first_output(out))
            except _StopForward:
                pass
    return outputs


# Statistics that need the operator's input in the dense block, i.e. an extra pass with the dense weights.
_DENSE_PASS_STATISTICS = frozenset({"cross", "dense_hessian"})


class _StatisticsCollector:
    """Forward hooks on a group of linears that accumulate the statistics a method asked for.

    With ``cross`` or ``dense_hessian`` requested, every batch runs twice: first with the block's dense weights
    (the hooks keep each operator's dense input X), then as currently pruned (the hooks take X̂ and add X X̂ᵀ and/or
    X Xᵀ). Each pass stops as soon as the last operator of the group has seen its input.
    """

    def __init__(self, targets: list[PruningTarget], needs: frozenset[str], device: torch.device):
        self.targets = targets
        self.needs = needs
        self.device = device
        self.stats: dict[str, LinearStatistics] = {}
        for target in targets:
            n_in = target.module.in_features
            self.stats[target.name] = LinearStatistics(
                n_tokens=0,
                sq_norm=torch.zeros(n_in, device=device) if "sq_norm" in needs else None,
                hessian=torch.zeros(n_in, n_in, device=device) if needs & {"hessian", "cross"} else None,
                cross=torch.zeros(n_in, n_in, device=device) if "cross" in needs else None,
                dense_hessian=torch.zeros(n_in, n_in, device=device) if "dense_hessian" in needs else None,
            )
        self.dense_phase = False
        self.stop_early = False
        self._dense_inputs: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()

    def _hook(self, name: str):
        def hook(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.device, torch.float32)  # (tokens, in)
            if self.dense_phase:
                self._dense_inputs[name] = x
            else:
                stats = self.stats[name]
                stats.n_tokens += x.shape[0]
                if stats.sq_norm is not None:
                    stats.sq_norm += x.pow(2).sum(0)
                if stats.hessian is not None:
                    stats.hessian += x.T @ x
                dense_x = self._dense_inputs.pop(name, None)
                if stats.cross is not None:
                    stats.cross += dense_x.T @ x  # X X̂ᵀ: (in, T) @ (T, in)
                if stats.dense_hessian is not None:
                    stats.dense_hessian += dense_x.T @ dense_x  # X Xᵀ
            self._seen.add(name)
            if self.stop_early and len(self._seen) == len(self.targets):
                raise _StopForward

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [t.module.register_forward_hook(self._hook(t.name)) for t in self.targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def collect(self, block: nn.Module, inputs: BlockInputs, dense_weights: dict[str, torch.Tensor] | None) -> None:
        self.stop_early = True
        with self.hooks():
            for i in range(len(inputs.hidden_states)):
                one = BlockInputs(inputs.hidden_states[i : i + 1], inputs.extra_args[i : i + 1], inputs.kwargs[i : i + 1])
                if self.needs & _DENSE_PASS_STATISTICS:
                    self.dense_phase, self._seen = True, set()
                    run_block(block, one, weights=dense_weights)
                self.dense_phase, self._seen = False, set()
                run_block(block, one)


# ----------------------------------------------------------------------------------------------------------------
# The engine


def select_targets(block: nn.Module, block_name: str, include: list[str] | None, exclude: list[str] | None,
                   sparsity_for: Callable[[str], float]) -> list[PruningTarget]:
    """Linears of ``block`` to prune, filtered by the include/exclude regular expressions on full names."""
    targets = []
    for rel_name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{block_name}.{rel_name}"
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        targets.append(PruningTarget(name, module, sparsity_for(name)))
    return targets


def group_targets(targets: list[PruningTarget], block_name: str, adapter: ArchitectureAdapter,
                  sequential: bool) -> list[list[PruningTarget]]:
    """Split a block's targets into execution-order groups (or one group when ``sequential`` is False)."""
    if not sequential:
        return [targets]
    by_rel = {t.name[len(block_name) + 1 :]: t for t in targets}
    groups = [[by_rel.pop(rel) for rel in group if rel in by_rel] for group in adapter.operator_groups]
    groups = [g for g in groups if g]
    if by_rel:
        # Operators the adapter does not place (e.g. extra adapters) are pruned last, after everything they may read.
        groups.append(list(by_rel.values()))
    return groups


def check_pattern_fits(targets: list[PruningTarget], pattern: SparsityPattern) -> None:
    """Raise before anything is pruned if an N:M ``pattern`` cannot tile a target's input dimension."""
    if not pattern.is_n_m:
        return
    for target in targets:
        if target.module.in_features % pattern.m:
            raise ValueError(
                f"pattern {str(pattern)!r} needs in_features to be a multiple of {pattern.m}, but module "
                f"{target.name!r} has in_features={target.module.in_features}; leave it out with "
                f"exclude=[{target.name!r}] or use a pattern whose M divides {target.module.in_features}"
            )


def plan_targets(model: nn.Module, include: list[str] | None, exclude: list[str] | None, pattern: SparsityPattern,
                 sparsity_for: Callable[[str], float]) -> tuple[ArchitectureAdapter, list]:
    """The model's adapter and ``(block, block_name, targets)`` for every decoder block, checked up front: raises if
    nothing matches ``include``/``exclude`` or the pattern cannot tile a target. Works on a meta-device skeleton, so
    it can run before any weight is loaded."""
    adapter = get_architecture(model)
    prefix = adapter.block_prefix(model)
    per_block = []
    for index, block in enumerate(adapter.blocks(model)):
        block_name = f"{prefix}.{index}"
        per_block.append((block, block_name, select_targets(block, block_name, include, exclude, sparsity_for)))
    all_targets = [t for _, _, targets in per_block for t in targets]
    if not all_targets:
        raise ValueError(f"no linear module matched include={include!r} exclude={exclude!r} inside the decoder blocks")
    check_pattern_fits(all_targets, pattern)
    return adapter, per_block


class LayerwiseEngine:
    """Prunes a model block by block with one :class:`PruningMethod`.

    >>> engine = LayerwiseEngine(method, SparsityPattern.parse("2:4"), lambda name: 0.5)  # doctest: +SKIP
    >>> engine.run(model, calibration_ids, batch_size=8)  # doctest: +SKIP
    """

    def __init__(self, method: PruningMethod, pattern: SparsityPattern, sparsity_for: Callable[[str], float],
                 include: list[str] | None = None, exclude: list[str] | None = None, device: str | None = None,
                 parallel: bool = False, num_workers: int | None = None, show_progress: bool = True):
        self.method = method
        self.pattern = pattern
        self.sparsity_for = sparsity_for
        self.include = include
        self.exclude = exclude
        self.device = device
        self.parallel = parallel
        self.num_workers = num_workers
        self.show_progress = show_progress
        if parallel and not method.propagate_dense:
            raise ValueError(
                f"parallel=True needs blocks that are independent of each other; method {method.name!r} feeds each "
                "block the outputs of the already-pruned blocks, so its blocks must run in order"
            )

    # -- per operator -------------------------------------------------------------------------------------------
    def _prune_target(self, target: PruningTarget, stats: LinearStatistics | None,
                      device: torch.device) -> tuple[int, int]:
        with readable_weight(target.module, device) as weight:
            original_dtype = weight.dtype
            new_weight, mask = self.method.prune_weight(
                weight.to(device, torch.float32).clone(), stats, self.pattern, target.sparsity
            )
            final = (new_weight * mask).to(original_dtype)
            write_weight(target.module, final)
        return int((final == 0).sum().item()), final.numel()

    # -- per block ----------------------------------------------------------------------------------------------
    def prune_block(self, block: nn.Module, groups: list[list[PruningTarget]], inputs: BlockInputs | None,
                    device: torch.device, dense_weights: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, tuple[int, int]]:
        """Prune one block in place; returns ``(zeros, numel)`` per operator. ``dense_weights`` (the block's
        unpruned target weights) is needed by methods that collect the ``cross`` or ``dense_hessian`` statistic."""
        achieved = {}
        needs = self.method.statistics
        for group in groups:
            stats = {}
            if needs:
                collector = _StatisticsCollector(group, needs, device)
                collector.collect(block, inputs, dense_weights)
                stats = collector.stats
            for target in group:
                achieved[target.name] = self._prune_target(target, stats.get(target.name), device)
            del stats
        return achieved

    @property
    def _keeps_dense_weights(self) -> bool:
        return self.method.propagate_dense or bool(self.method.statistics & _DENSE_PASS_STATISTICS)

    @staticmethod
    def _dense_weights(block: nn.Module, targets: list[PruningTarget]) -> dict[str, torch.Tensor]:
        names = {id(t.module): t for t in targets}
        return {
            f"{rel}.weight": module.weight.detach().clone()
            for rel, module in block.named_modules()
            if id(module) in names
        }

    # -- whole model --------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, calibration_ids: torch.Tensor | None, batch_size: int = 8) -> EngineResult:
        """Prune ``model`` in place. ``calibration_ids`` (samples, seq) may be ``None`` for data-free methods."""
        adapter, per_block = plan_targets(model, self.include, self.exclude, self.pattern, self.sparsity_for)
        blocks = adapter.blocks(model)
        plan = [
            (block, targets, group_targets(targets, block_name, adapter, self.method.sequential_within_block))
            for block, block_name, targets in per_block
        ]
        result = EngineResult()
        progress = tqdm(total=len(plan), desc=f"pruning ({self.method.name}, {self.pattern})", unit="block",
                        disable=not self.show_progress)
        if not self.method.needs_calibration:
            for block, targets, groups in plan:
                device = execution_device(block, self.device)
                with block_on_device(block, device):
                    result.counts.update(self.prune_block(block, groups, None, device))
                progress.update()
            progress.close()
            return result
        if calibration_ids is None:
            raise ValueError(f"method {self.method.name!r} needs calibration data")

        first_device = execution_device(blocks[0], self.device)
        with block_on_device(blocks[0], first_device):
            inputs = capture_block_inputs(model, blocks[0], calibration_ids, batch_size, first_device)
        if self.parallel:
            result.counts.update(self._run_parallel(plan, inputs, progress))
        else:
            for block, targets, groups in plan:
                device = execution_device(block, self.device)
                inputs = inputs.to(device)
                with block_on_device(block, device):
                    dense = self._dense_weights(block, targets) if self._keeps_dense_weights else None
                    result.counts.update(self.prune_block(block, groups, inputs, device, dense))
                    propagate = dense if self.method.propagate_dense else None
                    inputs = inputs.with_hidden_states(run_block(block, inputs, weights=propagate))
                progress.update()
        progress.close()
        return result

    def _run_parallel(self, plan, inputs: BlockInputs, progress) -> dict[str, tuple[int, int]]:
        """Blocks fed dense inputs are independent: cache every block's dense inputs with one dense pass, then prune
        the blocks concurrently in worker threads (torch kernels release the GIL). Same results as in order."""
        per_block_inputs = []
        for block, _targets, _groups in plan:
            device = execution_device(block, self.device)
            inputs = inputs.to(device)
            per_block_inputs.append(inputs)
            with block_on_device(block, device):
                inputs = inputs.with_hidden_states(run_block(block, inputs))

        def work(job):
            (block, targets, groups), block_inputs = job
            device = execution_device(block, self.device)
            with block_on_device(block, device):
                dense = self._dense_weights(block, targets) if self._keeps_dense_weights else None
                achieved = self.prune_block(block, groups, block_inputs, device, dense)
            progress.update()
            return achieved

        achieved: dict[str, tuple[int, int]] = {}
        with ThreadPoolExecutor(max_workers=self.num_workers or min(len(plan), torch.get_num_threads())) as pool:
            for part in pool.map(work, zip(plan, per_block_inputs)):
                achieved.update(part)
        return achieved
