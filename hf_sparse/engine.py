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

Methods that feed every block dense inputs (``propagate_dense``) make blocks independent, so ``parallel=True`` prunes
them concurrently: in worker threads, or, under ``torchrun``/``accelerate launch``, one process per device with the
pruned weights shared afterwards (:mod:`hf_sparse.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
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


@dataclass
class BlockResult:
    """What pruning one block gave: ``(zeros, numel)`` per operator, and the block's dense outputs when a dense pass
    over the whole block was run anyway (so dense-propagating methods need not run it again)."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_outputs: list[torch.Tensor] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Devices and weights


def _has_offload(module: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def _dispatched(block: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in block.modules())


def check_device_available(device: str | None) -> None:
    """Raise before any work if ``device`` names an accelerator this machine does not have."""
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


# Statistics of the dense block (X, or the dense output W·X) next to X̂.
_DENSE_PASS_STATISTICS = frozenset({"cross", "dense_hessian", "dense_output_sq_norm"})


def _flat_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(device, torch.float32)  # (tokens, in)


def _output_sq_norm(module: nn.Linear, output: torch.Tensor) -> torch.Tensor:
    """‖W x‖² summed over the tokens of one forward call (the bias is not part of the reconstruction)."""
    output = output.detach().float()
    if getattr(module, "bias", None) is not None:
        output = output - module.bias.detach().float()
    return output.pow(2).sum(dtype=torch.float64)


class _DenseInputs:
    """Every operator's input X in the *dense* block, per calibration batch, from one dense pass over the block.

    Methods that compare X̂ with X (``cross``, ``dense_hessian``, ``dense_output_sq_norm``) would otherwise need a dense
    pass per operator group. The same pass gives the block's dense outputs, which dense-propagating methods take as
    the next block's inputs. Operators that read the same tensor share one stored copy. Costs at most
    ``tokens × Σ in_features × 4`` bytes; the engine falls back to a dense pass per group above ``dense_cache_bytes``.
    """

    def __init__(self, block: nn.Module, targets: list[PruningTarget], inputs: BlockInputs,
                 dense_weights: dict[str, torch.Tensor] | None, device: torch.device):
        self.per_batch: list[dict[str, torch.Tensor]] = []
        self.output_sq_norms = {t.name: torch.zeros((), dtype=torch.float64, device=device) for t in targets}
        current: dict[str, torch.Tensor] = {}
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(raw input) -> (raw input, stored copy)

        def hook_for(name):
            def hook(module, args, output):
                self.output_sq_norms[name] += _output_sq_norm(module, output).to(device)
                raw = args[0]
                stored = seen.get(id(raw))
                if stored is None or stored[0] is not raw:
                    stored = seen[id(raw)] = (raw, _flat_float(raw, device))
                current[name] = stored[1]

            return hook

        handles = [t.module.register_forward_hook(hook_for(t.name)) for t in targets]
        self.outputs: list[torch.Tensor] = []
        try:
            for i in range(len(inputs.hidden_states)):
                current, seen = {}, {}
                one = BlockInputs(inputs.hidden_states[i : i + 1], inputs.extra_args[i : i + 1], inputs.kwargs[i : i + 1])
                self.outputs.extend(run_block(block, one, weights=dense_weights))
                self.per_batch.append(current)
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def size_bound(targets: list[PruningTarget], inputs: BlockInputs) -> int:
        tokens = sum(h.shape[:-1].numel() for h in inputs.hidden_states)
        return 4 * tokens * sum(t.module.in_features for t in targets)

    def release(self, targets: list[PruningTarget]) -> None:
        """Drop the inputs of operators that are done (a tensor shared with a later operator stays alive)."""
        for batch in self.per_batch:
            for target in targets:
                batch.pop(target.name, None)


class _StatisticsCollector:
    """Forward hooks on a group of linears that accumulate the statistics a method asked for.

    The hooks see X̂, each operator's input in the block as currently pruned. Statistics of the dense block
    (``cross`` = XX̂ᵀ, ``dense_hessian`` = XXᵀ, ``dense_output_sq_norm`` = ‖WX‖²) come from ``dense_inputs``: one dense
    pass per block (:class:`_DenseInputs`), or, when that cache would be too large, ``"recompute"``: a dense pass of
    their own before each batch. For the first group of a block nothing is pruned yet, so X̂ = X and
    ``dense_inputs="same"`` skips the dense pass: one matrix X̂X̂ᵀ is all three Gram statistics, and the outputs the
    hooks see are the dense ones.

    Operators that read the very same input tensor (q/k/v, gate/up) share one accumulator instead of each
    multiplying the same X̂ᵀX̂. Each pass stops as soon as the last operator of the group has seen its input.
    """

    def __init__(self, targets: list[PruningTarget], needs: frozenset[str], device: torch.device,
                 dense_inputs: _DenseInputs | str = "same"):
        self.targets = targets
        self.needs = needs
        self.device = device
        self.dense_inputs = dense_inputs  # a _DenseInputs, "same" (X̂ = X) or "recompute"
        self.stats: dict[str, LinearStatistics] = {}
        same = dense_inputs == "same"
        for target in targets:
            n_in = target.module.in_features
            hessian = torch.zeros(n_in, n_in, device=device) if needs & {"hessian", "cross", "dense_hessian"} else None
            self.stats[target.name] = LinearStatistics(
                n_tokens=0,
                sq_norm=torch.zeros(n_in, device=device) if "sq_norm" in needs else None,
                hessian=hessian,
                # With X̂ = X all three are one matrix: share it rather than accumulate copies.
                cross=(hessian if same else torch.zeros_like(hessian)) if "cross" in needs else None,
                dense_hessian=(hessian if same else torch.zeros_like(hessian)) if "dense_hessian" in needs else None,
            )
        self.dense_phase = False
        self._dense_x: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        # Per pass: id(input tensor) -> (the tensor, kept alive so its id stays unique; the first operator that read it).
        self._pass_inputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._shares_input_with: dict[str, str] = {}
        self._output_sq_norms = {t.name: torch.zeros((), dtype=torch.float64, device=device) for t in targets}

    def _start_pass(self, dense: bool) -> None:
        self.dense_phase, self._seen, self._pass_inputs = dense, set(), {}

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        stats = self.stats[name]
        stats.n_tokens += x.shape[0]
        if stats.sq_norm is not None:
            stats.sq_norm += x.pow(2).sum(0)
        if stats.hessian is not None:
            stats.hessian.addmm_(x.T, x)  # X̂ X̂ᵀ: (in, T) @ (T, in)
        if self.dense_inputs == "same" or (stats.cross is None and stats.dense_hessian is None):
            return  # nothing against X, or cross and dense_hessian are the hessian itself
        dense_x = self._dense_x[name]
        if stats.cross is not None:
            stats.cross.addmm_(dense_x.T, x)  # X X̂ᵀ
        if stats.dense_hessian is not None:
            stats.dense_hessian.addmm_(dense_x.T, dense_x)  # X Xᵀ

    def _hook(self, name: str):
        def hook(module, args, output):
            # The output is the dense one in a dense pass, and in the first group's pass (nothing pruned yet).
            if "dense_output_sq_norm" in self.needs and (self.dense_phase or self.dense_inputs == "same"):
                self._output_sq_norms[name] += _output_sq_norm(module, output).to(self.device)
            raw = args[0]
            first_reader = self._pass_inputs.get(id(raw))
            if first_reader is not None and first_reader[0] is raw:
                self._shares_input_with[name] = first_reader[1]
            else:
                self._pass_inputs[id(raw)] = (raw, name)
                if self.dense_phase:
                    self._dense_x[name] = _flat_float(raw, self.device)
                else:
                    self._accumulate(name, _flat_float(raw, self.device))
            self._seen.add(name)
            if len(self._seen) == len(self.targets):
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
        recompute = self.dense_inputs == "recompute" and bool(self.needs & _DENSE_PASS_STATISTICS)
        with self.hooks():
            for i in range(len(inputs.hidden_states)):
                one = BlockInputs(inputs.hidden_states[i : i + 1], inputs.extra_args[i : i + 1], inputs.kwargs[i : i + 1])
                self._dense_x = {}
                if recompute:
                    self._start_pass(dense=True)
                    run_block(block, one, weights=dense_weights)
                elif isinstance(self.dense_inputs, _DenseInputs):
                    self._dense_x = self.dense_inputs.per_batch[i]
                self._start_pass(dense=False)
                run_block(block, one)
        self._pass_inputs, self._dense_x = {}, {}
        for name, first_reader in self._shares_input_with.items():
            self.stats[name] = dataclasses.replace(self.stats[first_reader])  # shares the tensors, not the scalars
        if "dense_output_sq_norm" in self.needs:
            norms = self.dense_inputs.output_sq_norms if isinstance(self.dense_inputs, _DenseInputs) \
                else self._output_sq_norms
            for name, stats in self.stats.items():
                stats.dense_output_sq_norm = float(norms[name])


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


#: Largest cache of a block's dense operator inputs (see :class:`_DenseInputs`); above it every operator group
#: reruns the dense block instead, which is slower but needs no memory beyond one batch.
DENSE_CACHE_BYTES = 4 * 2**30


class LayerwiseEngine:
    """Prunes a model block by block with one :class:`PruningMethod`.

    >>> engine = LayerwiseEngine(method, SparsityPattern.parse("2:4"), lambda name: 0.5)  # doctest: +SKIP
    >>> engine.run(model, calibration_ids, batch_size=8)  # doctest: +SKIP
    """

    def __init__(self, method: PruningMethod, pattern: SparsityPattern, sparsity_for: Callable[[str], float],
                 include: list[str] | None = None, exclude: list[str] | None = None, device: str | None = None,
                 parallel: bool = False, num_workers: int | None = None, show_progress: bool = True,
                 dense_cache_bytes: int = DENSE_CACHE_BYTES):
        self.method = method
        self.pattern = pattern
        self.sparsity_for = sparsity_for
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
            final = (new_weight.mul_(mask) if new_weight is work else new_weight * mask).to(original_dtype)
            write_weight(target.module, final)
        return final.numel() - int(torch.count_nonzero(final)), final.numel()

    # -- per block ----------------------------------------------------------------------------------------------
    def prune_block(self, block: nn.Module, groups: list[list[PruningTarget]], inputs: BlockInputs | None,
                    device: torch.device, dense_weights: dict[str, torch.Tensor] | None = None) -> BlockResult:
        """Prune one block in place. ``dense_weights`` (the block's unpruned target weights) is needed by methods that
        collect a statistic of the dense block (``cross``, ``dense_hessian``, ``dense_output_sq_norm``)."""
        result = BlockResult()
        needs = self.method.statistics
        dense_inputs: _DenseInputs | str = "recompute"
        later = [t for group in groups[1:] for t in group]
        if needs & _DENSE_PASS_STATISTICS and later and \
                _DenseInputs.size_bound(later, inputs) <= self.dense_cache_bytes:
            dense_inputs = _DenseInputs(block, later, inputs, dense_weights, device)
            result.dense_outputs = dense_inputs.outputs
        for index, group in enumerate(groups):
            stats = {}
            if needs:
                # Nothing of this block is pruned before its first group: there X̂ is X.
                collector = _StatisticsCollector(group, needs, device, "same" if index == 0 else dense_inputs)
                collector.collect(block, inputs, dense_weights)
                stats = collector.stats
            for target in group:
                result.counts[target.name] = self._prune_target(target, stats.get(target.name), device)
            del stats
            if isinstance(dense_inputs, _DenseInputs):
                dense_inputs.release(group)
        return result

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
                    result.counts.update(self.prune_block(block, groups, None, device).counts)
                progress.update()
            progress.close()
            return result
        if calibration_ids is None:
            raise ValueError(f"method {self.method.name!r} needs calibration data")

        state = None
        if self.parallel and distributed.launched_with_several_processes():
            # Created before anything runs: it sets up the process group and this process's GPU.
            state = distributed.process_state(self.device)
            progress.disable = progress.disable or not state.is_main_process
        first_device = execution_device(blocks[0], self.device)
        with block_on_device(blocks[0], first_device):
            inputs = capture_block_inputs(model, blocks[0], calibration_ids, batch_size, first_device)
        if state is not None:
            result.counts.update(self._run_distributed(plan, inputs, progress, state))
        elif self.parallel:
            result.counts.update(self._run_parallel(plan, inputs, progress))
        else:
            result.counts.update(self._run_in_order(plan, inputs, progress))
        progress.close()
        return result

    def _run_in_order(self, plan, inputs: BlockInputs, progress, owned: set[int] | None = None
                      ) -> dict[str, tuple[int, int]]:
        """Prune the blocks one after the other, each on the outputs of the previous one (pruned, or dense for
        dense-propagating methods). With ``owned``, only those blocks are pruned and the others merely run dense to
        reach them; nothing after the last owned block runs."""
        achieved: dict[str, tuple[int, int]] = {}
        last = len(plan) - 1 if owned is None else max(owned, default=-1)
        for index, (block, targets, groups) in enumerate(plan[: last + 1]):
            device = execution_device(block, self.device)
            inputs = inputs.to(device)
            with block_on_device(block, device):
                if owned is not None and index not in owned:
                    # Left to another process; still dense here, so running it gives the next block's dense inputs.
                    inputs = inputs.with_hidden_states(run_block(block, inputs))
                    continue
                dense = self._dense_weights(block, targets) if self._keeps_dense_weights else None
                pruned = self.prune_block(block, groups, inputs, device, dense)
                achieved.update(pruned.counts)
                if index == last:
                    outputs = []  # nothing reads them
                elif self.method.propagate_dense and pruned.dense_outputs is not None:
                    outputs = pruned.dense_outputs
                else:
                    outputs = run_block(block, inputs, weights=dense if self.method.propagate_dense else None)
                inputs = inputs.with_hidden_states(outputs)
            progress.update()
        return achieved

    def _run_distributed(self, plan, inputs: BlockInputs, progress, state) -> dict[str, tuple[int, int]]:
        """One process per device: each prunes its contiguous share of the (independent) blocks, then every pruned
        weight is broadcast from the process that pruned it, so all processes end with the same model."""
        owned = distributed.blocks_of_this_process(state, len(plan))
        self._run_in_order(plan, inputs, progress, owned=set(owned))
        owners = distributed.block_owners(owned)
        achieved: dict[str, tuple[int, int]] = {}
        for index, (block, targets, _groups) in enumerate(plan):
            device = execution_device(block, self.device)
            for target in targets:
                with readable_weight(target.module, device) as weight:
                    shared = distributed.broadcast_from(weight, owners[index], state)
                write_weight(target.module, shared)
                achieved[target.name] = (int((shared == 0).sum().item()), shared.numel())
            if owners[index] != state.process_index:
                progress.update()
        state.wait_for_everyone()  # nobody leaves while another process still reads a broadcast
        return achieved

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
                achieved = self.prune_block(block, groups, block_inputs, device, dense).counts
            progress.update()
            return achieved

        achieved: dict[str, tuple[int, int]] = {}
        with ThreadPoolExecutor(max_workers=self.num_workers or min(len(plan), torch.get_num_threads())) as pool:
            for part in pool.map(work, zip(plan, per_block_inputs)):
                achieved.update(part)
        return achieved
