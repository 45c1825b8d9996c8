"""Structured pruning in the engine: what a structured method may measure, and the one path from its decision to a
smaller model.

A structured method (:class:`hf_sparse.methods.structured.StructuredPruningMethod`) gets a :class:`StructuredSession`
and returns :class:`~hf_sparse.surgery.StructuredEdits`; :func:`run_structured` applies them through
:mod:`hf_sparse.surgery` and returns the shape record. The engine reaches it through the ``structured`` pipeline of
:mod:`hf_sparse.engine.pipelines`, chosen for every method that declares ``edits_structure``. The session offers three measurements, all on the *dense*
model, one block's activations alive at a time:

* :meth:`StructuredSession.dense_block_passes` - every block's calibration inputs and outputs, in order, with the
  per-channel mean and variance of the inputs of chosen linears (FLAP's fluctuation, ShortGPT's block influence);
* :meth:`StructuredSession.calibration_nll` - the calibration loss with some blocks bypassed (SLEB);
* :meth:`StructuredSession.unit_parameters` / :attr:`StructuredSession.block_parameters` /
  :meth:`StructuredSession.parameters_of_block` - what removing a head, an MLP channel or a block saves, so a method
  can meet a parameter budget.

With a non-uniform sparsity profile the session also carries :attr:`StructuredSession.block_targets`, each block's
share of its own parameters to remove, from the same planner unstructured methods use
(:func:`hf_sparse.config.profiles.allocate`); only methods declaring ``per_block_targets`` accept them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architectures import ArchitectureAdapter, get_architecture
from ..surgery import StructuredEdits, apply_and_describe, block_parameters, block_shape, unit_parameters
from ..surgery.apply import BlockShape, _submodule
from .capture import capture_block_inputs, run_block
from .devices import block_on_device, execution_device

logger = logging.getLogger(__name__)


@dataclass
class InputMoments:
    """Per-input-channel mean and (sample) variance of one linear's input over all calibration tokens."""

    count: int
    mean: torch.Tensor  # (in,) float64
    variance: torch.Tensor  # (in,) float64


class _MomentAccumulator:
    def __init__(self):
        self.count, self.total, self.total_sq = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.total_sq = torch.zeros_like(self.total)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += x.pow(2).sum(0)

    def result(self) -> InputMoments:
        mean = self.total / self.count
        # Sample variance (n - 1), as FLAP's running estimate; float64 keeps Σx² - n·mean² from cancelling badly.
        variance = (self.total_sq - self.count * mean.pow(2)).clamp_min(0) / max(1, self.count - 1)
        return InputMoments(self.count, mean, variance)


@dataclass
class BlockPass:
    """One dense block on the calibration data: its index, inputs, outputs and observed input moments."""

    index: int
    block: nn.Module
    shape: BlockShape
    inputs: list[torch.Tensor]  # each (batch, seq, hidden)
    outputs: list[torch.Tensor]
    moments: dict[str, InputMoments] = field(default_factory=dict)  # by linear name relative to the block


class StructuredSession:
    """Read-only access to a dense model and its calibration data for a structured method.

    >>> session = StructuredSession(model, calibration_ids, batch_size=8)  # doctest: +SKIP
    >>> [p.index for p in session.dense_block_passes()]  # doctest: +SKIP
    [0, 1, 2, 3, 4, 5]
    """

    def __init__(self, model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 8,
                 device: str | None = None, show_progress: bool = True,
                 block_targets: Mapping[int, float] | None = None):
        self.model = model
        self.adapter: ArchitectureAdapter = get_architecture(model)
        self.model_type: str | None = getattr(model.config, "model_type", None)
        self.calibration_ids = calibration_ids
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress
        #: each block's share of its own parameters to remove (``None``: one overall budget, the method shares it out)
        self.block_targets: dict[int, float] | None = None
        if block_targets is not None:
            self.block_targets = {int(i): float(t) for i, t in block_targets.items()}
            missing = sorted(set(range(self.num_blocks)) - set(self.block_targets))
            extra = sorted(set(self.block_targets) - set(range(self.num_blocks)))
            if missing or extra:
                raise ValueError(f"per-block targets must name every decoder block 0..{self.num_blocks - 1} once; "
                                 f"missing {missing}, unknown {extra}")
            for index, target in self.block_targets.items():
                if not 0.0 <= target < 1.0:
                    raise ValueError(f"block {index}'s target share must be in [0, 1), got {target!r}")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks(self.model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_parameters(self) -> int:
        """Parameters in all decoder blocks (the denominator of structured sparsity)."""
        return block_parameters(self.adapter, self.model)

    def parameters_of_block(self, index: int) -> int:
        """Parameters of block ``index`` (weights, biases and norms): what a per-block target is a share of."""
        return sum(p.numel() for p in self.blocks[index].parameters())

    def overall_target(self) -> float | None:
        """The parameter-weighted mean of :attr:`block_targets` over the blocks (``None`` without them)."""
        if self.block_targets is None:
            return None
        sizes = [self.parameters_of_block(i) for i in range(self.num_blocks)]
        return math.fsum(self.block_targets[i] * n for i, n in enumerate(sizes)) / sum(sizes)

    def block_shape(self, index: int) -> BlockShape:
        return block_shape(self.adapter, self.blocks[index])

    def unit_parameters(self, index: int) -> dict[str, int]:
        """Parameters of one ``kv_group``, ``query_head`` and ``mlp_channel`` of block ``index``."""
        return unit_parameters(self.adapter, self.blocks[index])

    def require(self, structure: str):
        """The adapter's declaration of ``structure``, or a ``ValueError`` naming architecture and structure."""
        return self.adapter.structure(structure, self.model_type)

    def weight(self, index: int, name: str) -> torch.Tensor:
        """A detached float32 copy of the weight of linear ``name`` (relative to block ``index``)."""
        return _submodule(self.blocks[index], name).weight.detach().float().clone()

    def dense_block_passes(self, observe: tuple[str, ...] = (), desc: str = "calibrating") -> Iterator[BlockPass]:
        """Yield every block's dense calibration pass in order; ``observe`` names linears (relative to a block) whose
        input moments are collected. The next block's inputs are this block's outputs, so only one block's
        activations live at a time (plus the one yielded)."""
        blocks = self.blocks
        first_device = execution_device(blocks[0], self.device)
        with block_on_device(blocks[0], first_device):
            inputs = capture_block_inputs(self.model, blocks[0], self.calibration_ids, self.batch_size, first_device)
        for index in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not self.show_progress):
            block = blocks[index]
            device = execution_device(block, self.device)
            inputs = inputs.to(device)
            accumulators = {name: _MomentAccumulator() for name in observe}
            handles = [
                _submodule(block, name).register_forward_hook(
                    lambda _m, args, _out, acc=acc: acc.add(args[0]))
                for name, acc in accumulators.items()
            ]
            try:
                with block_on_device(block, device):
                    outputs = run_block(block, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            yield BlockPass(index, block, block_shape(self.adapter, block), inputs.hidden_states, outputs,
                            {name: acc.result() for name, acc in accumulators.items()})
            inputs = inputs.with_hidden_states(outputs)

    @contextlib.contextmanager
    def _bypassing(self, skipped: set[int]) -> Iterator[None]:
        """Run the model as if blocks ``skipped`` were not there (the block list is restored afterwards)."""
        blocks = self.blocks
        original = list(blocks)
        try:
            for index in sorted(skipped, reverse=True):
                del blocks[index]
            yield
        finally:
            for index in range(len(blocks) - 1, -1, -1):
                del blocks[index]
            blocks.extend(original)

    def calibration_nll(self, skipped: set[int] | frozenset[int] = frozenset()) -> float:
        """Mean next-token negative log-likelihood over the calibration tokens, with blocks ``skipped`` bypassed."""
        embeddings = self.model.get_input_embeddings()
        device = embeddings.weight.device
        total, count = 0.0, 0
        with torch.no_grad(), self._bypassing(set(skipped)):
            for batch in self.calibration_ids.split(self.batch_size):
                batch = batch.to(device)
                logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += batch[:, 1:].numel()
        return total / count


def run_structured(model: nn.Module, method, calibration_ids: torch.Tensor, sparsity: float | None,
                   batch_size: int = 8, device: str | None = None, show_progress: bool = True,
                   block_targets: Mapping[int, float] | None = None) -> dict:
    """Let ``method`` decide the edits on the dense ``model``, apply them, and return the ``structure`` record.

    ``sparsity`` is the share of all decoder-block parameters to remove; with ``block_targets`` (block index -> share
    of that block's parameters, for methods declaring ``per_block_targets``) it may be ``None`` and the method is
    handed the targets' parameter-weighted mean."""
    # The sparsity record (hf_sparse.record) is a layer above the engine: its "structure" entry is read as stored.
    existing = getattr(model.config, "sparsity_config", None)
    if isinstance(existing, Mapping) and existing.get("structure") is not None:
        raise ValueError("this model was already pruned structurally; prune the dense model instead (the record "
                         "describes shapes relative to the dense original)")
    if block_targets is not None:
        method.check_block_targets()  # raises, naming the methods that take them, unless this one does
    session = StructuredSession(model, calibration_ids, batch_size, device, show_progress, block_targets)
    if block_targets is not None:
        sparsity = session.overall_target()
    edits = method.plan_edits(session, sparsity)
    if not isinstance(edits, StructuredEdits):
        raise TypeError(f"{type(method).__name__}.plan_edits must return StructuredEdits, got {type(edits).__name__}")
    return apply_and_describe(session.adapter, model, edits)
