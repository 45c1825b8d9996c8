"""PIP (Cao et al., 2025, arXiv 2501.15278): perturbation-based iterative structured pruning.

Only the paper's abstract is public: PIP uses a *double view* of the calibration data, an unperturbed one and a
perturbed one, compares the model's gradients on the two, and iteratively prunes the structures that "struggle to
distinguish between these two views". Our reading, every choice an option where a choice was made:

1. **Views.** The clean view is the calibration batch; the perturbed view is the same batch with either Gaussian noise
   on the input embeddings (``perturbation="embedding_noise"``; per token, standard deviation ``strength`` times that
   token's embedding RMS, so the strength is relative and model-independent) or a share ``strength`` of the tokens
   replaced by uniformly random vocabulary ids (``"token_replace"``; the targets stay the clean next tokens).
2. **Gradient difference.** ``Δg = ∇L_clean − ∇L_perturbed`` for every weight of q/k/v/o and of the MLP, accumulated
   over the calibration batches (one backward of ``L_clean − L_perturbed`` per batch gives it directly).
3. **Importance per structure.** First-order Taylor of that difference, ``Σ |w · Δg|`` over the weights of the
   structure: the rows of q/k/v and the columns of o of one key/value group (its query heads with their shared key and
   value head, so ``num_attention_heads / num_key_value_heads`` stays an integer; one head in multi-head attention),
   and the rows of gate/up and the column of down of one MLP channel. It estimates how differently removing the
   structure changes the loss on the two views: a structure whose removal affects both views alike does not tell them
   apart. By default (``normalization="layer"``) the scores are standardised within each block and structure kind, as
   FLAP does, and then ranked across all blocks; ``"parameters"`` ranks the raw score per parameter instead, which
   lets blocks with small gradient differences overall be emptied first (SmolLM2 at 20%: perplexity 104 against 56).
4. **Iterations.** ``rounds`` rounds: round ``r`` removes the lowest-scoring remaining units until ``r / rounds`` of the
   target share of block parameters is gone (the same closest-to-budget choice as FLAP, never a block's last group or
   channel). The removed units are masked (their inputs to o/down zeroed) before the next round's gradients, so later
   rounds score the already-pruned model. The edits are applied once at the end. The default is one round: more
   rounds were measured worse on both test models (README, PIP ablation).
5. **Per-block targets** (a non-uniform ``sparsity_profile``, OWL or explicit): instead of one budget ranked across
   blocks, block ``i`` loses the share ``t_i`` of its own parameters: the key/value groups and MLP channels that takes
   are counted once (:func:`hf_sparse.methods.units.block_unit_counts`, FLAP's per-layer rule, within half an MLP
   channel per block), round ``r`` removes the lowest-scoring remaining units up to ``r / rounds`` of each count.
6. **Uniform shapes** (``uniform_shapes=True``): every block loses the same counts, fixed after the first round's
   scores (:func:`hf_sparse.methods.units.uniform_unit_counts`: the key/value-group count from the global ranking,
   shared equally, the MLP channels making up the budget), then removed round by round as in 5. The config's own
   keys describe the result, so engines load it without hf_sparse.

Deterministic for a seed (the noise and the replaced tokens come from the pruning seed). Cost: ``rounds`` × 2 forwards
and one backward of the whole model per calibration batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..surgery import AttentionEdit, BlockEdit, MLPEdit, StructuredEdits
from ..surgery.apply import _submodule
from .base import MethodOptions, PaperReference, register_method
from .structured import StructuredPruningMethod
from .units import (Unit, block_target_counts, check_uniform_session, choose_units, lowest_units,
                    round_channel_counts, uniform_target_counts)

if TYPE_CHECKING:
    from ..architectures import AttentionHeads, MLPChannels
    from ..surgery.apply import BlockShape
    from ..engine.structured import StructuredSession

logger = logging.getLogger(__name__)

PERTURBATIONS = ("embedding_noise", "token_replace")
NORMALIZATIONS = ("parameters", "layer")


@dataclass
class PIPOptions(MethodOptions):
    perturbation: str = field(default="embedding_noise", metadata={
        "help": "How the perturbed view is made: 'embedding_noise' (Gaussian noise added to the input embeddings) or "
                "'token_replace' (a share of the input tokens replaced by random ids).", "choices": PERTURBATIONS})
    strength: float = field(default=0.1, metadata={
        "help": "Perturbation strength: the noise standard deviation relative to each token's embedding RMS "
                "(embedding_noise), or the share of tokens replaced (token_replace, at most 1).", "range": "> 0"})
    rounds: int = field(default=1, metadata={
        "help": "Pruning iterations; each re-measures the gradients on the model pruned so far and removes another "
                "1/rounds of the target.", "range": ">= 1"})
    normalization: str = field(default="layer", metadata={
        "help": "How scores of different blocks and structures are made comparable before the global ranking: "
                "'parameters' (each structure's score divided by its parameter count) or 'layer' (standardised "
                "within each block and structure kind, as FLAP: a key/value group scores the mean of its attention "
                "channels' standardised scores).", "choices": NORMALIZATIONS})
    bias_compensation: bool = field(default=False, metadata={
        "help": "Add the removed channels' mean contribution (measured on the dense model) as a bias of o_proj / "
                "down_proj, as FLAP does. Costs one more forward pass over the calibration data."})
    uniform_shapes: bool = field(default=False, metadata={
        "help": "Give every block the same number of key/value groups and MLP channels (the split between groups and "
                "channels from the first round's global ranking; each block removes its own lowest-scoring units), "
                "so the config describes every block and any engine loads the model."})
    channel_multiple: int = field(default=1, metadata={
        "help": "Round every block's kept MLP channel count to a multiple of this (e.g. 256 for llama.cpp's "
                "k-quants); needs counts decided up front: uniform_shapes=True or a per-block sparsity_profile.",
        "range": ">= 1"})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bias_compensation, bool):
            raise ValueError(f"pip option bias_compensation must be True or False, got {self.bias_compensation!r}")
        if not isinstance(self.uniform_shapes, bool):
            raise ValueError(f"pip option uniform_shapes must be True or False, got {self.uniform_shapes!r}")
        if isinstance(self.channel_multiple, bool) or not isinstance(self.channel_multiple, int) \
                or self.channel_multiple < 1:
            raise ValueError(f"pip option channel_multiple must be an integer >= 1, got {self.channel_multiple!r}")
        if self.perturbation == "token_replace" and self.strength > 1:
            raise ValueError(f"pip strength is the share of tokens replaced for perturbation='token_replace' and must "
                             f"be at most 1, got {self.strength}")


# ---------------------------------------------------------------------------------------------------------------
# Scores (pure functions of weights and gradient differences: hand-checkable)


def _row_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σ_j |W[i, j] · G[i, j]| per row i."""
    return (weight.float() * grad.float()).abs().sum(1)


def group_scores(decl: AttentionHeads, shape: BlockShape, weights: dict[str, torch.Tensor],
                 grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ |w · Δg| over the weights of every key/value group: its query heads' rows of q (and k/v head's rows of k and
    v) and the matching columns of o. ``weights``/``grads`` map the linears' names (relative to the block) to
    (out, in) tensors. Returns (kv_heads,).

    >>> from hf_sparse.architectures import get_architecture_for
    >>> from hf_sparse.surgery.apply import BlockShape
    >>> decl = get_architecture_for("llama").attention_heads
    >>> w = {n: torch.ones(2, 2) for n in (decl.query, decl.key, decl.value, decl.output)}
    >>> group_scores(decl, BlockShape(2, 2, 1, 4), w, w)
    tensor([8., 8.])
    """
    # a group's score is the sum of its channels' scores (one definition of the split, in attention_channel_scores)
    return attention_channel_scores(decl, shape, weights, grads).reshape(shape.kv_heads, -1).sum(1)


def attention_channel_scores(decl: AttentionHeads, shape: BlockShape, weights: dict[str, torch.Tensor],
                             grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`group_scores` split over the attention channels (the columns of o, heads × head_dim): channel ``j`` of
    query head ``h`` gets column ``j`` of o, its row of q and, under GQA, an equal share of row ``j % head_dim`` of
    its group's k and v heads. Summed over a group's channels this is the group's score. Returns (heads * head_dim,).

    >>> from hf_sparse.architectures import get_architecture_for
    >>> from hf_sparse.surgery.apply import BlockShape
    >>> decl = get_architecture_for("llama").attention_heads
    >>> w = {n: torch.ones(2, 2) for n in (decl.query, decl.key, decl.value, decl.output)}
    >>> attention_channel_scores(decl, BlockShape(2, 2, 1, 4), w, w)
    tensor([8., 8.])
    """
    d, heads, groups = shape.head_dim, shape.attention_heads, shape.kv_heads
    per_group = heads // groups
    scores = (weights[decl.output].float() * grads[decl.output].float()).abs().sum(0)  # (heads * d,)
    query = _row_scores(weights[decl.query], grads[decl.query])
    if decl.layout == "fused_per_head":  # rows [q_h; k_h; v_h] per head: channel j reads row j of each
        return scores + query.reshape(heads, 3, d).sum(1).reshape(-1)
    shared = sum(_row_scores(weights[name], grads[name]) for name in (decl.key, decl.value))  # (groups * d,)
    shared = shared.reshape(groups, 1, d).expand(groups, per_group, d).reshape(-1) / per_group
    return scores + query + shared


def channel_scores(decl: MLPChannels, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ |w · Δg| over the weights of every MLP channel: row c of each input linear (rows c and I + c of a fused
    [gate; up]) and column c of the output linear. Returns (channels,).

    >>> from hf_sparse.architectures import get_architecture_for
    >>> decl = get_architecture_for("llama").mlp_channels
    >>> w = {decl.inputs[0]: torch.ones(3, 2), decl.inputs[1]: torch.zeros(3, 2), decl.output: torch.ones(2, 3)}
    >>> channel_scores(decl, w, {n: 2 * t for n, t in w.items()})
    tensor([8., 8., 8.])
    """
    scores = (weights[decl.output].float() * grads[decl.output].float()).abs().sum(0)  # (channels,)
    for name in decl.inputs:
        rows = _row_scores(weights[name], grads[name])
        scores = scores + (rows.reshape(2, -1).sum(0) if decl.fused_halves else rows)
    return scores


def _standardise_among(scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with mean and (unbiased) std over the ``alive`` rows of ``scores`` only (all entries of those
    rows): removed units, masked to zero gradient, must not shift the statistics of the remaining ones.

    >>> _standardise_among(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
    tensor([-0.7071,  0.7071, 69.2965])
    """
    kept = scores[alive]
    std = kept.std() if kept.numel() > 1 else kept.new_tensor(0.0)
    return (scores - kept.mean()) / (std if std > 0 else 1.0)


def _dense_means(session: StructuredSession, *names: str) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per block, the mean input of each linear ``names`` over the calibration tokens, on the dense model."""
    return {step.index: tuple(step.moments[name].mean.float() for name in names)
            for step in session.dense_block_passes(observe=names, desc="pip input means")}


# ---------------------------------------------------------------------------------------------------------------
# Views, masks and gradients


def perturbed_view(model: nn.Module, ids: torch.Tensor, perturbation: str, strength: float,
                   generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, inputs_embeds) of the perturbed view of ``ids``: exactly one of the two is set."""
    if perturbation == "token_replace":
        replace = torch.rand(ids.shape, generator=generator) < strength
        random_ids = torch.randint(0, model.get_input_embeddings().num_embeddings, ids.shape, generator=generator)
        return torch.where(replace, random_ids, ids), None
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)  # (batch, seq, hidden)
    rms = embeds.float().pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(embeds.shape, generator=generator).to(embeds.device)
    return None, (embeds.float() + strength * rms * noise).to(embeds.dtype)


@contextlib.contextmanager
def masked_units(session: StructuredSession, removed: dict[tuple[int, str], set[int]]) -> Iterator[None]:
    """Run the model as if the ``removed`` units were gone: their inputs to o_proj / down_proj are zeroed (so they
    contribute nothing and receive zero gradient). Nothing in the model changes."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    handles = []
    for index in range(session.num_blocks):
        shape = session.block_shape(index)
        for kind, name, units, width in (("kv_group", heads.output, shape.kv_heads,
                                          shape.attention_heads * shape.head_dim),
                                         ("mlp_channel", mlp.output, shape.mlp_channels, shape.mlp_channels)):
            gone = removed.get((index, kind))
            if not gone:
                continue
            keep = torch.ones(units)
            keep[sorted(gone)] = 0
            keep = keep.repeat_interleave(width // units)  # (input features of o/down,)
            module = _submodule(session.blocks[index], name)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, keep=keep: (args[0] * keep.to(args[0].device, args[0].dtype), *args[1:])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lm_loss(model: nn.Module, targets: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


def gradient_difference(session: StructuredSession, names: list[tuple[int, str]], options: PIPOptions,
                        generator: torch.Generator, progress: tqdm) -> dict[tuple[int, str], torch.Tensor]:
    """Δg = ∇L_clean − ∇L_perturbed (mean over calibration batches) for the weight of every (block, linear)."""
    model = session.model
    params = [_submodule(session.blocks[index], name).weight for index, name in names]
    was_trainable = [p.requires_grad for p in params]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients only for the scored weights
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    batches = session.calibration_ids.split(session.batch_size)
    device = model.get_input_embeddings().weight.device
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = batch.to(device)
                perturbed_ids, perturbed_embeds = perturbed_view(model, batch, options.perturbation, options.strength,
                                                                 generator)
                difference = _lm_loss(model, batch, input_ids=batch) - _lm_loss(
                    model, batch, input_ids=perturbed_ids, inputs_embeds=perturbed_embeds)
                for total, grad in zip(totals, torch.autograd.grad(difference, params)):
                    total += grad.float() / len(batches)
                progress.update()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p, trainable in zip(params, was_trainable):
            p.requires_grad_(trainable)
    return dict(zip(names, totals))


@register_method
class PIPPruning(StructuredPruningMethod):
    """Remove key/value groups and MLP channels whose gradients differ least between a clean and a perturbed view."""

    name = "pip"
    display_name = "PIP"
    paper = PaperReference("PIP: Perturbation-based Iterative Pruning for Large Language Models",
                           "Cao et al.", 2025, "https://arxiv.org/abs/2501.15278")
    removes = ("attention_heads", "mlp_channels")
    per_block_targets = True
    options_class = PIPOptions

    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
        linears = [heads.query, heads.output, *mlp.inputs, mlp.output]
        if heads.layout == "separate":
            linears += [heads.key, heads.value]
        names = [(index, name) for index in range(session.num_blocks) for name in linears]
        shapes = [session.block_shape(index) for index in range(session.num_blocks)]
        costs = [session.unit_parameters(index) for index in range(session.num_blocks)]
        budget = sparsity * session.block_parameters
        # Per-block targets become unit counts before any gradient is taken (a share out of reach fails first).
        final_counts = (block_target_counts(session, self.options.bias_compensation)
                        if session.block_targets is not None else None)
        if self.options.uniform_shapes:
            check_uniform_session(session)
        elif final_counts is None and self.options.channel_multiple > 1:
            raise ValueError(f"pip option channel_multiple={self.options.channel_multiple} rounds counts decided up "
                             "front: use it with uniform_shapes=True or a per-block sparsity_profile")
        totals = {(i, kind): n for i, shape in enumerate(shapes)
                  for kind, n in (("kv_group", shape.kv_heads), ("mlp_channel", shape.mlp_channels))}
        if final_counts is not None:
            final_counts = round_channel_counts(final_counts, totals, self.options.channel_multiple)
        # The pruning seed (api forks and seeds the global RNG) fixes the perturbations.
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        removed: dict[tuple[int, str], set[int]] = {}
        removed_parameters = 0
        rounds = self.options.rounds
        batches = len(session.calibration_ids.split(session.batch_size))
        means = _dense_means(session, heads.output, mlp.output) if self.options.bias_compensation else None
        progress = tqdm(total=rounds * batches, desc="pip gradient difference", unit="batch",
                        disable=not session.show_progress)
        for round_index in range(1, rounds + 1):
            with masked_units(session, removed):
                grads = gradient_difference(session, names, self.options, generator, progress)
            units, left = [], {}
            for index, shape in enumerate(shapes):
                block = session.blocks[index]
                weights = {name: _submodule(block, name).weight.detach() for name in linears}
                block_grads = {name: grads[(index, name)] for name in linears}
                for kind, scores in self._unit_scores(heads, mlp, shape, weights, block_grads, removed, index,
                                                             costs[index]).items():
                    gone = removed.get((index, kind), set())
                    left[(index, kind)] = len(scores) - len(gone)
                    units += [Unit(s, costs[index][kind], index, kind, u)
                              for u, s in enumerate(scores) if u not in gone]
            if self.options.uniform_shapes and final_counts is None:  # counts fixed once, from round 1's ranking
                ranked = choose_units(units, budget, left)
                final_counts = round_channel_counts(
                    uniform_target_counts(session, sparsity, ranked, self.options.bias_compensation), totals,
                    self.options.channel_multiple)
            if final_counts is None:  # one budget, ranked across all blocks
                target = budget * round_index / rounds
                chosen = choose_units(units, target - removed_parameters, left)
            else:  # r / rounds of every block's own unit counts (units holds the remaining ones only)
                chosen = lowest_units(units, {key: math.floor(count * round_index / rounds + 0.5)
                                              - len(removed.get(key, ())) for key, count in final_counts.items()})
            for unit in chosen:
                removed.setdefault((unit.block, unit.kind), set()).add(unit.index)
                removed_parameters += unit.cost
            progress.set_postfix(removed=f"{removed_parameters / session.block_parameters:.3f}")
            logger.info("pip round %d/%d: %.4f of the block parameters removed", round_index, rounds,
                        removed_parameters / session.block_parameters)
        progress.close()
        return self._edits(removed, shapes, session, means)

    def _unit_scores(self, heads: AttentionHeads, mlp: MLPChannels, shape: BlockShape,
                     weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                     removed: dict[tuple[int, str], set[int]], index: int, costs: dict[str, int]
                     ) -> dict[str, list[float]]:
        """Comparable scores of every key/value group and MLP channel of one block (removed units included; the
        caller skips them): per parameter, or standardised over the block's remaining units of that kind."""
        if self.options.normalization == "parameters":
            return {"kv_group": [float(s) / costs["kv_group"] for s in group_scores(heads, shape, weights, grads)],
                    "mlp_channel": [float(s) / costs["mlp_channel"] for s in channel_scores(mlp, weights, grads)]}
        per_group = shape.attention_heads // shape.kv_heads
        width = per_group * shape.head_dim  # attention channels of one group
        attention = attention_channel_scores(heads, shape, weights, grads).reshape(shape.kv_heads, width)
        channels = channel_scores(mlp, weights, grads)
        gone_groups = sorted(removed.get((index, "kv_group"), set()))
        gone_channels = sorted(removed.get((index, "mlp_channel"), set()))
        alive_groups = torch.ones(shape.kv_heads, dtype=torch.bool)
        alive_groups[gone_groups] = False
        alive_channels = torch.ones(shape.mlp_channels, dtype=torch.bool)
        alive_channels[gone_channels] = False
        return {"kv_group": _standardise_among(attention, alive_groups).mean(1).tolist(),
                "mlp_channel": _standardise_among(channels, alive_channels).tolist()}

    @staticmethod
    def _edits(removed: dict[tuple[int, str], set[int]], shapes: list[BlockShape], session: StructuredSession,
               means: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> StructuredEdits:
        heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
        edits = StructuredEdits()
        for index, shape in enumerate(shapes):
            groups, channels = removed.get((index, "kv_group"), set()), removed.get((index, "mlp_channel"), set())
            if not groups and not channels:
                continue
            edit = BlockEdit()
            per_group = shape.attention_heads // shape.kv_heads
            if groups:
                edit.attention = AttentionEdit.whole_groups(
                    [g for g in range(shape.kv_heads) if g not in groups], per_group)
            if channels:
                edit.mlp = MLPEdit(tuple(c for c in range(shape.mlp_channels) if c not in channels))
            if means is not None:  # FLAP's compensation: the removed inputs' mean contribution becomes a bias
                width = per_group * shape.head_dim
                for name, gone, mean, stride in ((heads.output, groups, means[index][0], width),
                                                 (mlp.output, channels, means[index][1], 1)):
                    if gone:
                        cols = torch.cat([torch.arange(u * stride, (u + 1) * stride) for u in sorted(gone)])
                        edit.new_biases[name] = session.weight(index, name)[:, cols] @ mean[cols]
            edits.blocks[index] = edit
        return edits

