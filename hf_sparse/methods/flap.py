"""FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP): fluctuation-based adaptive structured pruning.

1. Fluctuation metric (WIFV): for each input channel j of ``o_proj`` and ``down_proj``, the sample variance of x_j over
   the calibration tokens of the dense model times ‖W[:, j]‖². As in the authors' code the attention metric is
   squared.
2. Adaptive structure search ("AL-AM"): the channel scores are standardised within each layer (attention and MLP
   separately), a head's score is the mean of its channels' standardised scores, and heads and MLP channels of all
   layers are ranked together; removing a unit costs its parameter count (a head is worth
   ``head parameters / MLP-channel parameters`` channels; 512/3 for LLaMA-7B in the paper's code, computed from the
   model's own shapes here, with its real ``head_dim``). The lowest-scoring units go until the removed parameters are
   closest to the target.
3. Bias compensation: the removed channels' mean input times their weight columns becomes a bias of ``o_proj`` /
   ``down_proj``, so the block's output keeps its mean.

With grouped-query attention the unit is a whole key/value group (its query heads' channels averaged), so
``num_attention_heads / num_key_value_heads`` stays an integer; for multi-head attention that is one head, as in the
paper. Every block keeps at least one group and one MLP channel.

With per-block targets (a non-uniform ``sparsity_profile``: OWL or explicit, from the same planner as unstructured
methods) step 2 is replaced by FLAP's uniform-per-layer rule ("UL-UM") with each block's own share: block ``i`` loses
the nearest count of its key/value groups to ``t_i`` of them and the MLP channels that make up the rest of ``t_i``
of its parameters (:func:`hf_sparse.methods.units.block_unit_counts`, within half an MLP channel per block, the new
compensation biases counted); within a block the lowest-scoring groups and channels go.

With ``uniform_shapes=True`` every block keeps the same number of key/value groups and MLP channels
(:func:`hf_sparse.methods.units.uniform_unit_counts`): the adaptive search still decides how many groups go in all
(shared equally among the blocks), the channels make up the budget, and each block removes its own lowest-scoring
units. Without compensation biases the config's own keys then describe the model (plain transformers and serving
engines load it); with them (the default) the biases need ``import hf_sparse`` in transformers, while a GGUF export
(:func:`hf_sparse.export_gguf`) keeps the model's own architecture, whose bias slots hold them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from typing import TYPE_CHECKING

from ..surgery import AttentionEdit, BlockEdit, MLPEdit, StructuredEdits
from .base import MethodOptions, PaperReference, register_method
from .structured import StructuredPruningMethod
from .units import (Unit, block_target_counts, check_uniform_session, choose_units, lowest_units,
                    round_kept_channels, uniform_target_counts)

if TYPE_CHECKING:
    from ..engine.structured import StructuredSession

logger = logging.getLogger(__name__)


@dataclass
class FLAPOptions(MethodOptions):
    bias_compensation: bool = field(default=True, metadata={
        "help": "Add the removed channels' mean contribution as a bias of o_proj / down_proj (the paper's baseline "
                "bias compensation)."})
    channel_multiple: int = field(default=1, metadata={
        "help": "Round every block's kept MLP channel count to a multiple of this (e.g. 8 or 64: widths that matrix "
                "kernels handle efficiently) by keeping or removing that block's next channels in score order; 1 "
                "keeps the exact search. The removed share moves by at most half a multiple per block.",
        "range": ">= 1"})
    uniform_shapes: bool = field(default=False, metadata={
        "help": "Give every block the same number of key/value groups and MLP channels (each block removes its own "
                "lowest-scoring ones; the split between groups and channels follows the global ranking), so the "
                "config describes every block and any engine loads the model; the default lets blocks differ."})

    def __post_init__(self):
        if not isinstance(self.bias_compensation, bool):
            raise ValueError(f"flap option bias_compensation must be True or False, got {self.bias_compensation!r}")
        if not isinstance(self.uniform_shapes, bool):
            raise ValueError(f"flap option uniform_shapes must be True or False, got {self.uniform_shapes!r}")
        if isinstance(self.channel_multiple, bool) or not isinstance(self.channel_multiple, int) \
                or self.channel_multiple < 1:
            raise ValueError(f"flap option channel_multiple must be an integer >= 1, got {self.channel_multiple!r}")


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer's channels (unbiased std, as torch.std and the reference)."""
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


@register_method
class FLAPPruning(StructuredPruningMethod):
    """Remove attention heads (key/value groups) and MLP channels by fluctuation, ranked across all layers."""

    name = "flap"
    display_name = "FLAP"
    paper = PaperReference("Fluctuation-based Adaptive Structured Pruning for Large Language Models",
                           "An et al.", 2024, "https://arxiv.org/abs/2312.11983")
    removes = ("attention_heads", "mlp_channels")
    per_block_targets = True
    options_class = FLAPOptions

    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        heads = session.require("attention_heads")
        mlp = session.require("mlp_channels")
        # Per-block targets are turned into unit counts first: a share out of a block's reach fails before the pass.
        if self.options.uniform_shapes:
            check_uniform_session(session)  # before the pass: per-block targets and one shape exclude each other
        per_block = (block_target_counts(session, self.options.bias_compensation)
                     if session.block_targets is not None else None)
        units: list[Unit] = []
        totals: dict[tuple[int, str], int] = {}
        means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for step in session.dense_block_passes(observe=(heads.output, mlp.output), desc="flap fluctuation"):
            shape, costs = step.shape, session.unit_parameters(step.index)
            w_out = session.weight(step.index, heads.output)  # (hidden, heads * head_dim)
            w_down = session.weight(step.index, mlp.output)  # (hidden, channels)
            attn = (step.moments[heads.output].variance.float() * w_out.pow(2).sum(0)).pow(2)  # (heads * head_dim,)
            channel = step.moments[mlp.output].variance.float() * w_down.pow(2).sum(0)  # (channels,)
            per_group = shape.attention_heads // shape.kv_heads
            # A group's score is the mean over all its query heads' channels of the layer-standardised scores.
            group_scores = _standardise(attn).reshape(shape.kv_heads, per_group * shape.head_dim).mean(1)
            channel_scores = _standardise(channel)
            units += [Unit(float(s), costs["kv_group"], step.index, "kv_group", g) for g, s in enumerate(group_scores)]
            units += [Unit(float(s), costs["mlp_channel"], step.index, "mlp_channel", c)
                      for c, s in enumerate(channel_scores)]
            totals[(step.index, "kv_group")] = shape.kv_heads
            totals[(step.index, "mlp_channel")] = shape.mlp_channels
            means[step.index] = (step.moments[heads.output].mean.float(), step.moments[mlp.output].mean.float())

        multiple = self.options.channel_multiple
        narrow = min(((width, index) for (index, kind), width in totals.items() if kind == "mlp_channel"),
                     default=None)
        if multiple > 1 and narrow is not None and multiple >= narrow[0]:
            # Every kept width would have to be the full one: the MLPs could not shrink at all (silently 0% there).
            raise ValueError(f"flap option channel_multiple={multiple} is not below the MLP width of block "
                             f"{narrow[1]} ({narrow[0]} channels): no smaller width is a multiple of it; use a "
                             f"multiple below {narrow[0]} (e.g. 8 or 64)")
        if self.options.uniform_shapes:  # one shape: AL-AM's split between groups and channels, the same per block
            ranked = choose_units(units, sparsity * session.block_parameters, totals)
            chosen = lowest_units(units, uniform_target_counts(session, sparsity, ranked,
                                                               self.options.bias_compensation))
        elif per_block is None:  # one budget, units of all blocks ranked together (AL-AM)
            chosen = choose_units(units, sparsity * session.block_parameters, totals)
        else:  # each block its own share (UL-UM with per-block shares)
            chosen = lowest_units(units, per_block)
        chosen = round_kept_channels(units, chosen, totals, self.options.channel_multiple)
        removed: dict[tuple[int, str], set[int]] = {}
        for unit in chosen:
            removed.setdefault((unit.block, unit.kind), set()).add(unit.index)
        edits = StructuredEdits()
        for index in range(session.num_blocks):
            groups, channels = removed.get((index, "kv_group"), set()), removed.get((index, "mlp_channel"), set())
            if not groups and not channels:
                continue
            shape = session.block_shape(index)
            edit = BlockEdit()
            mean_attn, mean_mlp = means[index]
            if groups:
                per_group = shape.attention_heads // shape.kv_heads
                edit.attention = AttentionEdit.whole_groups(
                    [g for g in range(shape.kv_heads) if g not in groups], per_group)
                if self.options.bias_compensation:
                    cols = torch.cat([torch.arange(g * per_group * shape.head_dim, (g + 1) * per_group * shape.head_dim)
                                      for g in sorted(groups)])
                    w_out = session.weight(index, heads.output)
                    edit.new_biases[heads.output] = w_out[:, cols] @ mean_attn[cols]
            if channels:
                edit.mlp = MLPEdit(tuple(c for c in range(shape.mlp_channels) if c not in channels))
                if self.options.bias_compensation:
                    cols = torch.tensor(sorted(channels))
                    w_down = session.weight(index, mlp.output)
                    edit.new_biases[mlp.output] = w_down[:, cols] @ mean_mlp[cols]
            edits.blocks[index] = edit
        logger.info("flap: removing %d key/value groups and %d MLP channels",
                    sum(u.kind == "kv_group" for u in chosen), sum(u.kind == "mlp_channel" for u in chosen))
        return edits
