"""Calibration statistics of each pruned operator's input: a registry, and the hooks that accumulate them.

A statistic is registered once, by name, with how to allocate its accumulator, how to add one forward call's
tokens to it, and what it reads: the operator's input ``X̂`` in the block as currently pruned, that input next to
the dense block's ``X``, or the operator's output in the dense block. A method lists the names it needs in
``PruningMethod.statistics`` and finds the values in the :class:`LinearStatistics` it is handed. A method file can
add a statistic of its own with :func:`register_statistic` without touching the engine:

>>> @register_statistic("mean_abs_input", allocate=lambda n_in, device: torch.zeros(n_in, device=device),
...                     finalize=lambda total, n_tokens: total / n_tokens)
... def _mean_abs_input(total, x):  # x: (tokens, in)
...     total += x.abs().sum(0)
>>> STATISTICS["mean_abs_input"].reads
<Reads.INPUT: 'input'>
>>> _ = STATISTICS.pop("mean_abs_input")
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from .capture import BlockInputs, StopForward, run_block


@dataclass
class LinearStatistics:
    """Calibration statistics of one linear operator's input, summed over all calibration tokens.

    ``X`` is the operator's input in the dense model, ``X̂`` its input in the model being pruned (they coincide
    unless the method asks for dense propagation, see :attr:`PruningMethod.propagate_dense`). Columns are tokens.
    Statistics registered outside the built-in five are in ``extra``; ``stats[name]`` reads any of them.

    >>> stats = LinearStatistics(n_tokens=2, sq_norm=torch.tensor([1.0, 4.0]))
    >>> stats["sq_norm"].tolist()
    [1.0, 4.0]
    """

    n_tokens: int
    sq_norm: torch.Tensor | None = None  # (in,)      Σ_t x̂_t²  (per input feature)
    hessian: torch.Tensor | None = None  # (in, in)   X̂ X̂ᵀ
    cross: torch.Tensor | None = None  # (in, in)     X X̂ᵀ
    dense_hessian: torch.Tensor | None = None  # (in, in)  X Xᵀ  (the dense model's own input Gram matrix)
    # ‖W X‖²_F: the operator's squared output norm in the dense block, bias excluded. A scalar per operator, so it
    # costs nothing, where tr(W·XXᵀ·Wᵀ) would need XXᵀ.
    dense_output_sq_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # registered statistics beyond the five above, by name

    def __getitem__(self, name: str) -> Any:
        if name in _BUILT_IN_FIELDS:
            return getattr(self, name)
        if name not in self.extra:
            raise KeyError(f"statistic {name!r} was not collected; collected: {sorted(self.extra)} and the built-in "
                           f"{sorted(_BUILT_IN_FIELDS)}; list it in the method's `statistics`")
        return self.extra[name]

    def set(self, name: str, value: Any) -> None:
        """Store the value of statistic ``name`` (a built-in field, or an entry of ``extra``)."""
        if name in _BUILT_IN_FIELDS:
            setattr(self, name, value)
        else:
            self.extra[name] = value


_BUILT_IN_FIELDS = frozenset(f.name for f in dataclasses.fields(LinearStatistics)) - {"n_tokens", "extra"}


class Reads(enum.Enum):
    """What a statistic is accumulated from, and so which forward passes it needs."""

    INPUT = "input"  # X̂: accumulate(total, x) with x (tokens, in)
    INPUT_AND_DENSE_INPUT = "input_and_dense_input"  # X̂ and X: accumulate(total, x, dense_x)
    DENSE_OUTPUT = "dense_output"  # the operator's output in the dense block: accumulate(total, module, output)
    # X̂ and the operator's dense output W·X without its bias: accumulate(total, x, dense_output), (tokens, out).
    # Such a statistic belongs to one operator (it depends on W), so operators reading the same input never share it.
    INPUT_AND_DENSE_OUTPUT = "input_and_dense_output"


@dataclass(frozen=True)
class Statistic:
    """One registered statistic (see :func:`register_statistic`)."""

    name: str
    reads: Reads
    # (in_features, device) -> zero accumulator; (module, device) for Reads.INPUT_AND_DENSE_OUTPUT
    allocate: Callable[[Any, torch.device], torch.Tensor]
    accumulate: Callable[..., None]  # adds one forward call in place; its arguments depend on `reads`
    finalize: Callable[[torch.Tensor, int], Any] | None = None  # (accumulator, n_tokens) -> value for the method
    # The statistic this one equals while nothing of the block is pruned (X̂ = X): then it is that one, shared.
    equals_when_unpruned: str | None = None

    @property
    def needs_dense_block(self) -> bool:
        """Reads the dense block (so the engine keeps dense weights and, past a block's first group, runs it)."""
        return self.reads is not Reads.INPUT

    def allocate_for(self, module: nn.Module, device: torch.device) -> torch.Tensor:
        """The zero accumulator of this statistic for the linear ``module``."""
        if self.reads is Reads.INPUT_AND_DENSE_OUTPUT:
            return self.allocate(module, device)
        return self.allocate(module.in_features, device)

    def value(self, accumulator: torch.Tensor, n_tokens: int) -> Any:
        return accumulator if self.finalize is None else self.finalize(accumulator, n_tokens)


#: Every statistic a method may ask for, by name.
STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str, *, allocate: Callable[[Any, torch.device], torch.Tensor],
                       reads: Reads = Reads.INPUT, finalize: Callable[[torch.Tensor, int], Any] | None = None,
                       equals_when_unpruned: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering the decorated accumulate function as statistic ``name``.

    ``allocate(in_features, device)`` makes the zero accumulator (``allocate(module, device)`` for
    :attr:`Reads.INPUT_AND_DENSE_OUTPUT`, whose accumulator may be shaped by the output width); the function adds one
    forward call to it in place: ``f(total, x)`` for :attr:`Reads.INPUT` (``x`` is the operator's input,
    ``(tokens, in)`` float32), ``f(total, x, dense_x)`` for :attr:`Reads.INPUT_AND_DENSE_INPUT`,
    ``f(total, module, output)`` for :attr:`Reads.DENSE_OUTPUT`, ``f(total, x, dense_output)`` for
    :attr:`Reads.INPUT_AND_DENSE_OUTPUT` (``dense_output`` is ``W·x`` in the dense block, ``(tokens, out)``).
    ``finalize(total, n_tokens)`` turns the accumulator into the value the method reads (default: the accumulator
    itself). Operators that read the same input tensor share input statistics.

    >>> @register_statistic("input_sum", allocate=lambda n_in, device: torch.zeros(n_in, device=device))
    ... def _input_sum(total, x):
    ...     total += x.sum(0)
    >>> _ = STATISTICS.pop("input_sum")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a statistic name must be an identifier, got {name!r}")
    if name in STATISTICS or name in ("n_tokens", "extra"):
        raise ValueError(f"a statistic named {name!r} is already registered")
    if not isinstance(reads, Reads):
        raise ValueError(f"reads must be one of {[r.name for r in Reads]}, got {reads!r}")
    if equals_when_unpruned is not None and (equals_when_unpruned not in STATISTICS
                                             or STATISTICS[equals_when_unpruned].reads is not Reads.INPUT):
        raise ValueError(f"equals_when_unpruned={equals_when_unpruned!r} must name a registered statistic of the "
                         f"input alone; registered: {sorted(STATISTICS)}")

    def decorate(accumulate: Callable) -> Callable:
        STATISTICS[name] = Statistic(name, reads, allocate, accumulate, finalize, equals_when_unpruned)
        return accumulate

    return decorate


def check_statistics(names: Iterable[str], owner: str) -> None:
    """Raise if ``owner`` (a method class name) asks for statistics nobody registered."""
    unknown = set(names) - set(STATISTICS)
    if unknown:
        raise ValueError(f"{owner} asks for unknown statistics {sorted(unknown)}; allowed: {sorted(STATISTICS)}")


def needs_dense_block(names: Iterable[str]) -> bool:
    """True if any of the statistics ``names`` reads the dense block."""
    return any(STATISTICS[name].needs_dense_block for name in names)


# ----------------------------------------------------------------------------------------------------------------
# The built-in statistics


def _vector(n_in: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_in, device=device)


def _square(n_in: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_in, n_in, device=device)


def _scalar(_n_in: int, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


@register_statistic("sq_norm", allocate=_vector)
def _sq_norm(total: torch.Tensor, x: torch.Tensor) -> None:
    total += x.pow(2).sum(0)  # Σ_t x̂_t², (in,)


@register_statistic("hessian", allocate=_square)
def _hessian(total: torch.Tensor, x: torch.Tensor) -> None:
    total.addmm_(x.T, x)  # X̂ X̂ᵀ: (in, T) @ (T, in)


@register_statistic("cross", allocate=_square, reads=Reads.INPUT_AND_DENSE_INPUT, equals_when_unpruned="hessian")
def _cross(total: torch.Tensor, x: torch.Tensor, dense_x: torch.Tensor) -> None:
    total.addmm_(dense_x.T, x)  # X X̂ᵀ


@register_statistic("dense_hessian", allocate=_square, reads=Reads.INPUT_AND_DENSE_INPUT,
                    equals_when_unpruned="hessian")
def _dense_hessian(total: torch.Tensor, _x: torch.Tensor, dense_x: torch.Tensor) -> None:
    total.addmm_(dense_x.T, dense_x)  # X Xᵀ


def _by_output_and_input(module: nn.Module, device: torch.device) -> torch.Tensor:
    return torch.zeros(module.out_features, module.in_features, device=device)


@register_statistic("dense_output_cross", allocate=_by_output_and_input, reads=Reads.INPUT_AND_DENSE_OUTPUT)
def _dense_output_cross(total: torch.Tensor, x: torch.Tensor, dense_output: torch.Tensor) -> None:
    """``W·XX̂ᵀ`` accumulated as ``(WX)X̂ᵀ``, (out, in): out·in multiply-adds per token instead of the in·in of
    ``XX̂ᵀ`` (and no ``W·XX̂ᵀ`` product afterwards), cheaper for operators narrower at the output than at the input
    (``down_proj``), whose dense output the block computes anyway."""
    total.addmm_(dense_output.T, x)


@register_statistic("dense_output_sq_norm", allocate=_scalar, reads=Reads.DENSE_OUTPUT,
                    finalize=lambda total, _n_tokens: float(total))
def _dense_output_sq_norm(total: torch.Tensor, module: nn.Linear, output: torch.Tensor) -> None:
    """‖W x‖² summed over the tokens of one forward call (the bias is not part of the reconstruction)."""
    output = output.detach().float()
    if getattr(module, "bias", None) is not None:
        output = output - module.bias.detach().float()
    total += output.pow(2).sum(dtype=torch.float64).to(total.device)


# ----------------------------------------------------------------------------------------------------------------
# Collecting them


def _flat_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(device, torch.float32)  # (tokens, in)


def _flat_output(module: nn.Module, output: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A linear's output as ``(tokens, out)`` float32 without its bias: ``W·x`` (the bias is not reconstructed)."""
    flat = _flat_float(output, device)
    bias = getattr(module, "bias", None)
    # A copy either way: the block may go on to update its output in place (a residual `+=`).
    return flat.clone() if bias is None else flat - bias.detach().to(device, torch.float32)


Value = TypeVar("Value")


class SharedInputs(Generic[Value]):
    """Within one forward pass, recognises an input tensor that an earlier operator already read (q/k/v read one
    normed tensor, gate/up another), so its statistics or its stored copy are made once.

    >>> seen = SharedInputs(); x = torch.ones(2)
    >>> seen.get_or_add(x, lambda: "q_proj"), seen.get_or_add(x, lambda: "k_proj")
    (('q_proj', True), ('q_proj', False))
    """

    def __init__(self):
        # id(tensor) -> (the tensor, kept alive so its id stays unique; the value made for it)
        self._by_id: dict[int, tuple[torch.Tensor, Value]] = {}

    def get_or_add(self, tensor: torch.Tensor, make: Callable[[], Value]) -> tuple[Value, bool]:
        """The value stored for ``tensor`` and ``False``, or ``make()`` (now stored) and ``True`` if it is new."""
        entry = self._by_id.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1], False
        value = make()
        self._by_id[id(tensor)] = (tensor, value)
        return value, True


class DenseSource(enum.Enum):
    """Where a statistics pass finds the dense block's operator inputs X (and outputs)."""

    SAME = "same"  # nothing of the block is pruned yet: X̂ is X, and the outputs seen are the dense ones
    CACHED = "cached"  # from one dense pass over the whole block (a DenseInputCache)
    RECOMPUTE = "recompute"  # from a dense pass of its own before each batch


class DenseInputCache:
    """Every operator's input X in the *dense* block, per calibration batch, from one dense pass over the block.

    Statistics that compare X̂ with X would otherwise need a dense pass per operator group. The same pass gives the
    block's dense outputs, which dense-propagating methods take as the next block's inputs, accumulates the
    statistics of the dense outputs, and keeps the dense outputs ``W·X`` of the operators in ``keep_outputs`` (for
    :attr:`Reads.INPUT_AND_DENSE_OUTPUT` statistics). Operators that read the same tensor share one stored copy.
    Costs at most :meth:`size_bound` bytes; the engine falls back to :attr:`DenseSource.RECOMPUTE` above its budget.
    """

    def __init__(self, block: nn.Module, targets: list, inputs: BlockInputs,
                 dense_weights: dict[str, torch.Tensor] | None, device: torch.device,
                 output_statistics: Iterable[Statistic] = (), keep_outputs: Iterable[str] = ()):
        output_statistics = list(output_statistics)
        keep_outputs = set(keep_outputs)
        self.per_batch: list[dict[str, torch.Tensor]] = []
        self.outputs_per_batch: list[dict[str, torch.Tensor]] = []  # name -> W·X (tokens, out), for keep_outputs
        self.output_totals = {
            t.name: {s.name: s.allocate_for(t.module, device) for s in output_statistics} for t in targets
        }
        self.outputs: list[torch.Tensor] = []
        self._current: dict[str, torch.Tensor] = {}
        self._current_outputs: dict[str, torch.Tensor] = {}
        self._shared: SharedInputs[torch.Tensor] = SharedInputs()

        def hook_for(name):
            def hook(module, args, output):
                for statistic in output_statistics:
                    statistic.accumulate(self.output_totals[name][statistic.name], module, output)
                if name in keep_outputs:
                    self._current_outputs[name] = _flat_output(module, output, device)
                raw = args[0]
                self._current[name], _ = self._shared.get_or_add(raw, lambda: _flat_float(raw, device))

            return hook

        handles = [t.module.register_forward_hook(hook_for(t.name)) for t in targets]
        try:
            for one in inputs.batches():
                self._current, self._current_outputs, self._shared = {}, {}, SharedInputs()
                self.outputs.extend(run_block(block, one, weights=dense_weights))
                self.per_batch.append(self._current)
                self.outputs_per_batch.append(self._current_outputs)
        finally:
            for handle in handles:
                handle.remove()
        self._current, self._current_outputs, self._shared = {}, {}, SharedInputs()

    @staticmethod
    def size_bound(targets: list, inputs: BlockInputs, keep_outputs: Iterable[str] = ()) -> int:
        """Bytes the cache of ``targets``' inputs (and the outputs of those named in ``keep_outputs``) can take at
        most."""
        keep_outputs = set(keep_outputs)
        widths = sum(t.module.in_features + (t.module.out_features if t.name in keep_outputs else 0) for t in targets)
        return 4 * inputs.token_count() * widths

    def release(self, targets: list) -> None:
        """Drop the inputs and outputs of operators that are done (a tensor shared with a later operator stays
        alive)."""
        for batch, outputs in zip(self.per_batch, self.outputs_per_batch):
            for target in targets:
                batch.pop(target.name, None)
                outputs.pop(target.name, None)


class StatisticsCollector:
    """Forward hooks on a group of linears that accumulate the statistics a method asked for.

    The hooks see X̂, each operator's input in the block as currently pruned. Statistics of the dense block take X
    and the dense outputs from ``dense``: :attr:`DenseSource.CACHED` (one dense pass per block, ``cache``),
    :attr:`DenseSource.RECOMPUTE` (a dense pass of their own before each batch) or :attr:`DenseSource.SAME` (the
    block's first group: nothing is pruned yet, so X̂ = X, and a statistic that then equals another, like
    XX̂ᵀ = X̂X̂ᵀ, is that one). With :attr:`DenseSource.SAME` and a ``cache`` holding the group's inputs, no pass runs
    at all: the cached dense inputs are X̂.

    ``needs`` names the statistics of every operator, or maps each operator's name to its own (see
    :meth:`PruningMethod.statistics_for`). Operators that read the very same input tensor (q/k/v, gate/up) share
    one accumulator of each input statistic instead of each multiplying the same X̂ᵀX̂. Each pass stops as soon as
    the last operator of the group has its input (before it runs), or, in a pass that reads outputs, once it has
    run.

    >>> collector = StatisticsCollector(targets, frozenset({"hessian"}), torch.device("cpu"))  # doctest: +SKIP
    >>> collector.collect(block, inputs, None); collector.stats[targets[0].name].hessian.shape  # doctest: +SKIP
    """

    def __init__(self, targets: list, needs: Iterable[str] | Mapping[str, Iterable[str]], device: torch.device,
                 dense: DenseSource = DenseSource.SAME, cache: DenseInputCache | None = None):
        if not isinstance(dense, DenseSource):
            raise ValueError(f"dense must be a DenseSource ({[d.name for d in DenseSource]}), got {dense!r}")
        if dense is DenseSource.CACHED and cache is None:
            raise ValueError("dense=DenseSource.CACHED needs the DenseInputCache to read")
        if dense is DenseSource.RECOMPUTE and cache is not None:
            raise ValueError("dense=DenseSource.RECOMPUTE recomputes the dense block: pass no DenseInputCache")
        self.targets = targets
        self.device = device
        self.dense = dense
        self.cache = cache
        self._needs = {t.name: frozenset(needs[t.name] if isinstance(needs, Mapping) else needs) for t in targets}
        needed = [STATISTICS[name] for name in sorted(frozenset().union(*self._needs.values()))]
        same = dense is DenseSource.SAME
        # With X̂ = X a statistic equal to another is that one: share it rather than accumulate copies.
        self._aliases = {s.name: s.equals_when_unpruned for s in needed if same and s.equals_when_unpruned}
        collected = {s.name: s for s in needed if s.name not in self._aliases}
        collected.update({base: STATISTICS[base] for base in self._aliases.values()})
        self._input_statistics = [s for s in collected.values() if s.reads is Reads.INPUT]
        self._paired_statistics = [s for s in collected.values() if s.reads is Reads.INPUT_AND_DENSE_INPUT]
        self._output_statistics = [s for s in collected.values() if s.reads is Reads.DENSE_OUTPUT]
        # Statistics of one operator's own (its dense output's), by operator: never shared between operators.
        self._own_paired_output = {
            name: [s for s in collected.values() if s.reads is Reads.INPUT_AND_DENSE_OUTPUT and s.name in wanted]
            for name, wanted in self._needs.items()}
        self._reads_any_output = bool(self._output_statistics) or any(self._own_paired_output.values())
        # The first group's pass sees the dense outputs itself: statistics of the outputs are taken in its hooks.
        self._outputs_live = same and cache is None
        self._needs_dense_pass = dense is DenseSource.RECOMPUTE and any(s.needs_dense_block for s in needed)
        shared = self._input_statistics + self._paired_statistics
        own_outputs = self._output_statistics if cache is None else []
        self._totals = {
            t.name: {s.name: s.allocate_for(t.module, device)
                     for s in shared + self._own_paired_output[t.name]
                     + [o for o in own_outputs if o.name in self._needs[t.name]]}
            for t in targets}
        self._n_tokens = {t.name: 0 for t in targets}
        self.stats: dict[str, LinearStatistics] = {}
        self._dense_pass = False
        self._dense_x: dict[str, torch.Tensor] = {}
        self._dense_outputs: dict[str, torch.Tensor] = {}  # name -> W·X (tokens, out), for paired-output stats
        self._seen: set[str] = set()  # operators whose input this pass has seen
        self._outputs_seen: set[str] = set()  # ... and whose output statistics it has accumulated
        self._pass_inputs: SharedInputs[str] = SharedInputs()  # input tensor -> the first operator that read it
        self._shares_input_with: dict[str, str] = {}

    def _start_pass(self, dense: bool) -> None:
        self._dense_pass, self._seen, self._outputs_seen, self._pass_inputs = dense, set(), set(), SharedInputs()

    def _read_input(self, name: str, raw: torch.Tensor) -> None:
        """One operator's input in the current pass: kept as X in a dense pass, accumulated as X̂ otherwise."""
        first_reader, is_new = self._pass_inputs.get_or_add(raw, lambda: name)
        if not is_new:
            self._shares_input_with[name] = first_reader
        if self._dense_pass:
            if is_new:
                self._dense_x[name] = _flat_float(raw, self.device)
        elif is_new or (self._own_paired_output[name] and not self._outputs_live):
            self._accumulate(name, _flat_float(raw, self.device), shared=not is_new)
        self._seen.add(name)

    def _accumulate(self, name: str, x: torch.Tensor, shared: bool) -> None:
        """Add X̂ (``x``) of one forward call. ``shared``: an earlier operator read the same tensor, so the input
        statistics are that one's and only the operator's own statistics are added here."""
        totals = self._totals[name]
        if not shared:
            self._n_tokens[name] += x.shape[0]
            for statistic in self._input_statistics:
                statistic.accumulate(totals[statistic.name], x)
            if self._paired_statistics:
                dense_x = x if self.dense is DenseSource.SAME else self._dense_x[name]
                for statistic in self._paired_statistics:
                    statistic.accumulate(totals[statistic.name], x, dense_x)
        if not self._outputs_live:
            for statistic in self._own_paired_output[name]:
                statistic.accumulate(totals[statistic.name], x, self._dense_outputs[name])

    def _reads_outputs(self) -> bool:
        """Whether this pass must run the operators for statistics of their outputs: only when they are the dense
        ones (a dense pass, or the first group's pass with nothing pruned yet) and no cache has them already."""
        return self._reads_any_output and self.cache is None and (self._dense_pass or self.dense is DenseSource.SAME)

    def _input_hook(self, name: str):
        def hook(module, args):
            self._read_input(name, args[0])
            # A forward pre-hook: the pass can end before the last operator even runs (a full down_proj product
            # saved per batch), unless its output is read too.
            if len(self._seen) == len(self.targets) and not self._reads_outputs():
                raise StopForward

        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if not self._reads_outputs():
                return
            totals = self._totals[name]
            if self._own_paired_output[name]:
                dense_output = _flat_output(module, output, self.device)
                if self._dense_pass:
                    self._dense_outputs[name] = dense_output
                else:  # the first group's own pass: this output is the dense one and X̂ = X
                    x = _flat_float(args[0], self.device)
                    for statistic in self._own_paired_output[name]:
                        statistic.accumulate(totals[statistic.name], x, dense_output)
            for statistic in self._output_statistics:
                if statistic.name in self._needs[name]:
                    statistic.accumulate(totals[statistic.name], module, output)
            self._outputs_seen.add(name)
            if len(self._outputs_seen) == len(self.targets):
                raise StopForward

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [t.module.register_forward_pre_hook(self._input_hook(t.name)) for t in self.targets]
        if self._reads_any_output and self.cache is None:
            handles += [t.module.register_forward_hook(self._output_hook(t.name)) for t in self.targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def collect(self, block: nn.Module, inputs: BlockInputs, dense_weights: dict[str, torch.Tensor] | None) -> None:
        """Run ``block`` on every batch of ``inputs`` and fill :attr:`stats` (operator name -> statistics).
        ``dense_weights`` replaces the pruned weights in the dense passes of :attr:`DenseSource.RECOMPUTE`.
        With :attr:`DenseSource.SAME` and a cache nothing runs: the cached inputs are replayed."""
        if self.dense is DenseSource.SAME and self.cache is not None:
            self._replay_cache()
        else:
            with self.hooks():
                for index, one in enumerate(inputs.batches()):
                    self._dense_x, self._dense_outputs = {}, {}
                    if self._needs_dense_pass:
                        self._start_pass(dense=True)
                        run_block(block, one, weights=dense_weights)
                    elif self.cache is not None:
                        self._dense_x = self.cache.per_batch[index]
                        self._dense_outputs = self.cache.outputs_per_batch[index]
                    self._start_pass(dense=False)
                    run_block(block, one)
        self._pass_inputs, self._dense_x, self._dense_outputs = SharedInputs(), {}, {}
        self.stats = {t.name: self._statistics_of(t.name) for t in self.targets}

    def _replay_cache(self) -> None:
        """The first group's statistics from the cached dense pass: nothing is pruned yet, so its X̂ are the cached X
        (operators that read one tensor still find one cached tensor, and share)."""
        missing = [t.name for t in self.targets if t.name not in self.cache.per_batch[0]]
        if missing:
            raise ValueError(f"the DenseInputCache holds no inputs of {missing}")
        for batch, outputs in zip(self.cache.per_batch, self.cache.outputs_per_batch):
            self._start_pass(dense=False)
            self._dense_outputs = outputs
            for target in self.targets:
                self._read_input(target.name, batch[target.name])

    def _statistics_of(self, name: str) -> LinearStatistics:
        source = self._shares_input_with.get(name, name)  # input statistics are the first reader's
        n_tokens = self._n_tokens[source]
        stats = LinearStatistics(n_tokens=n_tokens)
        for statistic in self._input_statistics + self._paired_statistics:
            stats.set(statistic.name, statistic.value(self._totals[source][statistic.name], n_tokens))
        for alias, base in self._aliases.items():
            stats.set(alias, stats[base])
        for statistic in self._own_paired_output[name]:
            stats.set(statistic.name, statistic.value(self._totals[name][statistic.name], n_tokens))
        output_totals = self.cache.output_totals[name] if self.cache is not None else self._totals[name]
        for statistic in self._output_statistics:
            if statistic.name in self._needs[name]:
                stats.set(statistic.name, statistic.value(output_totals[statistic.name], n_tokens))
        return stats
