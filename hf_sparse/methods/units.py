"""Units of width pruning (a key/value group of attention heads, an MLP channel) and how many of them go.

The methods that remove units (FLAP, PIP) score every unit of every block, then meet a parameter budget in one of two
ways, both written once here:

* **One budget for the whole model** (the default, a uniform sparsity profile): :func:`choose_units` ranks the units
  of all blocks together and takes the lowest-scoring ones while each brings the removed total closer to the budget,
  so blocks lose different shares (FLAP's adaptive search, "AL-AM").
* **A target per block** (a non-uniform sparsity profile, OWL or explicit): block ``i`` loses the share ``t_i`` of
  *its own* parameters. :func:`block_unit_counts` decides how many units of each kind that is and
  :func:`lowest_units` picks the lowest-scoring ones within the block. This is FLAP's uniform-per-layer variant
  ("UL-UM": attention and MLP each lose the layer's share) with a share per block: the key/value groups, which are
  coarse (one costs as much as dozens of MLP channels), lose the count nearest to ``t_i`` of them, and the MLP
  channels make up the rest of the block's target, so every block lands within half an MLP channel's parameters of
  ``t_i`` times its parameters (see :func:`block_unit_counts` for the exact bound).
* **Uniform shapes** (the methods' ``uniform_shapes`` option): every block keeps the same number of key/value groups
  and MLP channels, so one set of config keys describes the model and every engine loads it without hf_sparse.
  :func:`uniform_unit_counts` takes the split between groups and channels from the method's global ranking (the
  number of groups it would remove over all blocks, shared equally) and gives every block the same counts;
  :func:`lowest_units` then picks each block's own lowest-scoring units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..surgery.apply import _submodule

if TYPE_CHECKING:
    from ..engine.structured import StructuredSession

KV_GROUP, MLP_CHANNEL = "kv_group", "mlp_channel"


@dataclass
class Unit:
    """One removable unit of one block, with the method's score (lower goes first) and its parameter count."""

    score: float
    cost: int
    block: int
    kind: str  # KV_GROUP | MLP_CHANNEL
    index: int


def choose_units(units: list[Unit], budget: float, totals: dict[tuple[int, str], int]) -> list[Unit]:
    """Units in ascending score order, each taken when it brings the removed total closer to ``budget``; never the
    last unit of a kind in a block (``totals[(block, kind)]`` units are left of each).

    >>> u = [Unit(0.1, 3, 0, "mlp_channel", 0), Unit(0.2, 3, 0, "mlp_channel", 1), Unit(0.3, 5, 0, "kv_group", 0)]
    >>> [x.index for x in choose_units(u, 4.0, {(0, "mlp_channel"): 3, (0, "kv_group"): 2})]
    [0]
    """
    left = dict(totals)
    chosen: list[Unit] = []
    removed = 0
    for unit in sorted(units, key=lambda u: (u.score, u.block, u.kind, u.index)):
        if left[(unit.block, unit.kind)] <= 1:
            continue
        # The reference stops at the first unit that overshoots; going on with the smaller units that still bring
        # the total closer lands within one MLP channel of the target instead of within one head.
        if abs(removed + unit.cost - budget) >= abs(removed - budget):
            continue
        chosen.append(unit)
        removed += unit.cost
        left[(unit.block, unit.kind)] -= 1
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# A target per block


@dataclass
class BlockUnits:
    """What one block can lose: its parameters (a block target is a share of these) and, per unit kind, how many
    units it has, what one costs, and what removing any unit of that kind adds back (a compensation bias that the
    method creates on ``o_proj`` / ``down_proj``, counted so the block's achieved share is the one recorded)."""

    index: int
    parameters: int
    counts: dict[str, int]
    costs: dict[str, int]
    added: dict[str, int] = field(default_factory=dict)

    def removed(self, kind: str, count: int) -> int:
        """Parameters gone when ``count`` units of ``kind`` go."""
        return count * self.costs[kind] - (self.added.get(kind, 0) if count else 0)


def _fill(block: BlockUnits, kind: str, rest: float) -> tuple[int, float]:
    """The count of ``kind`` (at most all but one) whose removed parameters are closest to ``rest``, and the error."""
    cost, added, most = block.costs[kind], block.added.get(kind, 0), block.counts[kind] - 1
    ideal = (rest + added) / cost
    candidates = {0} | {min(most, max(0, n)) for n in (math.floor(ideal), math.ceil(ideal))}
    count = min(candidates, key=lambda n: (abs(block.removed(kind, n) - rest), n))
    return count, abs(block.removed(kind, count) - rest)


def block_unit_counts(block: BlockUnits, share: float, coarse_hint: float | None = None,
                      coarse_allowed: Iterable[int] | None = None) -> dict[str, int]:
    """How many units of each kind ``block`` loses so that it loses ``share`` of its parameters.

    The coarse kind (the costlier unit: key/value groups) loses the count nearest to ``share`` of its units, as in
    FLAP's UL-UM; the fine kind (MLP channels) makes up the rest of the target ``share · parameters``. Bound: the
    removed parameters are within half a fine unit's cost of the target whenever the target can be reached keeping
    one unit of each kind and a coarse unit costs less than all the fine ones (true of every LLM block: the MLP is
    the larger half). When the fine kind cannot make up the rest at the nearest coarse count (a small target
    overshot by one whole group, or a large one beyond the MLP), the coarse count whose remainder it can make up
    closest is taken instead. A target beyond what the block can lose raises: a share is never silently clamped.
    ``coarse_hint`` replaces ``share`` times the coarse units as the count to stay nearest to (uniform shapes take
    it from the method's global ranking); ``coarse_allowed`` limits the coarse counts that may be removed (uniform shapes
    keep only head counts the model's config class accepts).

    >>> b = BlockUnits(0, 1000, counts={"kv_group": 4, "mlp_channel": 100}, costs={"kv_group": 100, "mlp_channel": 6})
    >>> block_unit_counts(b, 0.3)  # 1 of 4 groups (nearest to 1.2), then (300 - 100) / 6 = 33.3 -> 33 channels
    {'kv_group': 1, 'mlp_channel': 33}
    >>> block_unit_counts(b, 0.05)  # 0 of 4 groups (0.2), 50 / 6 = 8.3 -> 8 channels
    {'kv_group': 0, 'mlp_channel': 8}
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"block {block.index}: a target share must be in [0, 1), got {share!r}")
    kinds = sorted(block.counts, key=lambda k: (-block.costs[k], k))  # coarse first
    if not kinds or len(kinds) > 2:
        raise ValueError(f"block {block.index}: per-block targets split one or two unit kinds, got {kinds}")
    target = share * block.parameters
    fine = kinds[-1]
    most = sum(block.removed(k, block.counts[k] - 1) for k in kinds)
    if target > most + block.costs[fine] / 2:
        raise ValueError(f"block {block.index}: a target of {share:.4f} of its {block.parameters:,} parameters is out "
                         f"of reach; keeping one unit of each kind ({', '.join(kinds)}) it can lose at most "
                         f"{most / block.parameters:.4f}")
    if len(kinds) == 1:
        return {fine: _fill(block, fine, target)[0]}
    coarse = kinds[0]
    allowed = set(range(block.counts[coarse])) if coarse_allowed is None else set(coarse_allowed) | {0}
    options = {n: _fill(block, fine, target - block.removed(coarse, n)) for n in range(block.counts[coarse])
               if n in allowed}
    wanted = share * block.counts[coarse] if coarse_hint is None else coarse_hint
    nearest = max(0, min(block.counts[coarse] - 1, math.floor(wanted + 0.5)))
    if nearest in options and options[nearest][1] <= block.costs[fine] / 2:
        count = nearest
    else:
        count = min(options, key=lambda n: (options[n][1], abs(n - wanted)))
    return {coarse: count, fine: options[count][0]}


def lowest_units(units: Iterable[Unit], counts: Mapping[tuple[int, str], int]) -> list[Unit]:
    """The ``counts[(block, kind)]`` lowest-scoring units of each block and kind (ties: the lower index first).

    >>> u = [Unit(s, 1, 0, "mlp_channel", i) for i, s in enumerate([0.5, 0.1, 0.3])]
    >>> [x.index for x in lowest_units(u, {(0, "mlp_channel"): 2})]
    [1, 2]
    """
    groups: dict[tuple[int, str], list[Unit]] = {}
    for unit in units:
        groups.setdefault((unit.block, unit.kind), []).append(unit)
    return [unit for key, group in sorted(groups.items())
            for unit in sorted(group, key=lambda u: (u.score, u.index))[: counts.get(key, 0)]]


def block_units(session: StructuredSession, index: int, compensated: bool = False) -> BlockUnits:
    """:class:`BlockUnits` of dense block ``index``: its key/value groups and MLP channels. With ``compensated`` (the
    method adds the removed channels' mean contribution as a bias) an ``o_proj`` / ``down_proj`` without a bias
    gains one, which a block pays for as soon as it loses a unit of that kind."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    shape, block = session.block_shape(index), session.blocks[index]
    costs = session.unit_parameters(index)
    added = {}
    if compensated:
        for kind, name in ((KV_GROUP, heads.output), (MLP_CHANNEL, mlp.output)):
            output = _submodule(block, name)
            added[kind] = output.out_features if output.bias is None else 0
    return BlockUnits(index, session.parameters_of_block(index),
                      {KV_GROUP: shape.kv_heads, MLP_CHANNEL: shape.mlp_channels},
                      {KV_GROUP: costs[KV_GROUP], MLP_CHANNEL: costs[MLP_CHANNEL]}, added)


def block_target_counts(session: StructuredSession, compensated: bool = False) -> dict[tuple[int, str], int]:
    """Units of each kind every block loses to meet ``session.block_targets`` (see :func:`block_unit_counts`)."""
    if session.block_targets is None:
        raise ValueError("the session has no per-block targets")
    counts = {}
    for index in range(session.num_blocks):
        for kind, count in block_unit_counts(block_units(session, index, compensated),
                                             session.block_targets[index]).items():
            counts[(index, kind)] = count
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Uniform shapes


def uniform_unit_counts(blocks: Sequence[BlockUnits], share: float, ranked: Iterable[Unit] = (),
                        coarse_allowed: Iterable[int] | None = None) -> dict[tuple[int, str], int]:
    """The same count of each unit kind for every block, so that together they lose ``share`` of their parameters.

    The blocks must have one shape (what a dense model has). The key/value-group count stays nearest to the mean
    number of groups per block among ``ranked`` (the units the method's global ranking would remove; without them,
    ``share`` of the groups, as FLAP's uniform-per-layer rule), and the MLP channels make up the rest
    (:func:`block_unit_counts`: within half a channel's parameters per block). ``coarse_allowed``: the group counts
    that may be removed (others leave a shape the config class refuses), as in :func:`block_unit_counts`.

    >>> b = [BlockUnits(i, 1000, counts={"kv_group": 4, "mlp_channel": 100},
    ...                 costs={"kv_group": 100, "mlp_channel": 6}) for i in range(2)]
    >>> ranked = [Unit(0.0, 100, 0, "kv_group", 0), Unit(0.0, 100, 0, "kv_group", 1)]  # 2 groups over 2 blocks
    >>> uniform_unit_counts(b, 0.3, ranked)  # 1 group per block, (300 - 100) / 6 -> 33 channels
    {(0, 'kv_group'): 1, (0, 'mlp_channel'): 33, (1, 'kv_group'): 1, (1, 'mlp_channel'): 33}
    """
    if not blocks:
        raise ValueError("uniform shapes need at least one block")
    first = blocks[0]
    for block in blocks[1:]:
        if (block.parameters, block.counts, block.costs, block.added) != \
                (first.parameters, first.counts, first.costs, first.added):
            raise ValueError(f"uniform_shapes needs blocks of one shape, but block {block.index} has "
                             f"{block.counts} units where block {first.index} has {first.counts}; prune the dense "
                             "model")
    coarse = max(first.counts, key=lambda k: (first.costs[k], k))
    ranked = list(ranked)
    hint = (sum(u.kind == coarse for u in ranked) / len(blocks)) if ranked else None
    counts = block_unit_counts(first, share, coarse_hint=hint, coarse_allowed=coarse_allowed)
    return {(block.index, kind): count for block in blocks for kind, count in counts.items()}


def uniform_target_counts(session: StructuredSession, share: float, ranked: Iterable[Unit] = (),
                          compensated: bool = False) -> dict[tuple[int, str], int]:
    """:func:`uniform_unit_counts` for the blocks of ``session`` (``compensated``: see :func:`block_units`), removing
    only key/value-group counts whose head count the model's config class accepts (Llama wants ``hidden_size``
    divisible by the heads: 6 of 8 heads at width 256 could not be saved as config keys)."""
    check_uniform_session(session)
    return uniform_unit_counts([block_units(session, i, compensated) for i in range(session.num_blocks)], share,
                               ranked, stock_group_removals(session))


def stock_group_removals(session: StructuredSession) -> set[int]:
    """The numbers of key/value groups a block may lose so that the config class still describes the heads left."""
    from ..surgery.structure import _config_accepts

    decl = session.require("attention_heads")
    shape = session.block_shape(0)
    per_group = shape.attention_heads // shape.kv_heads
    allowed = set()
    for removed in range(shape.kv_heads):
        groups = shape.kv_heads - removed
        updates = {decl.heads_key: groups * per_group}
        if decl.kv_heads_key is not None:
            updates[decl.kv_heads_key] = groups
        if decl.head_dim_key is not None:
            updates[decl.head_dim_key] = shape.head_dim
        elif removed:
            continue  # head_dim follows hidden_size // heads: fewer heads cannot be described
        if _config_accepts(session.model.config, updates):
            allowed.add(removed)
    return allowed


def check_uniform_session(session: StructuredSession) -> None:
    """Raise before any measurement if ``session`` cannot give uniform shapes (per-block targets were asked for)."""
    if session.block_targets is not None:
        raise ValueError("uniform_shapes=True gives every block the same shape, so it cannot follow a non-uniform "
                         "sparsity_profile's per-block targets; use sparsity_profile='uniform' or "
                         "uniform_shapes=False")


def round_kept_channels(units: list[Unit], chosen: list[Unit], totals: dict[tuple[int, str], int],
                        multiple: int) -> list[Unit]:
    """``chosen`` with every block's kept MLP channel count rounded to the nearest multiple of ``multiple`` (at least
    one multiple, at most all channels): the block's lowest-scoring kept channels go, or its highest-scoring removed
    ones come back. Blocks with equal counts stay equal (uniform shapes stay uniform).

    >>> u = [Unit(float(i), 1, 0, "mlp_channel", i) for i in range(10)]
    >>> sorted(x.index for x in round_kept_channels(u, u[:3], {(0, "mlp_channel"): 10}, 4))  # keeps 7 -> 8
    [0, 1]
    """
    if multiple == 1:
        return chosen
    chosen_ids = {id(u) for u in chosen}
    result = [u for u in chosen if u.kind != MLP_CHANNEL]
    for (block, kind), total in sorted(totals.items()):
        if kind != MLP_CHANNEL:
            continue
        ranked = sorted((u for u in units if u.block == block and u.kind == kind),
                        key=lambda u: (u.score, u.index))  # ascending: removal order
        removed = sum(id(u) in chosen_ids for u in ranked)
        kept = total - removed
        target = min(total, max(multiple, multiple * round(kept / multiple)))
        # Removal follows the block's own score order, so the rounded choice is a prefix of it.
        result += ranked[: total - target] if target < total else []
    return result


def round_channel_counts(counts: Mapping[tuple[int, str], int], totals: Mapping[tuple[int, str], int],
                         multiple: int) -> dict[tuple[int, str], int]:
    """``counts`` (units removed per block and kind) with every block's kept MLP channels rounded to the nearest
    multiple of ``multiple`` (at least one multiple, at most all channels), as :func:`round_kept_channels` does
    for chosen units.

    >>> round_channel_counts({(0, "mlp_channel"): 3, (0, "kv_group"): 1}, {(0, "mlp_channel"): 10}, 4)
    {(0, 'mlp_channel'): 2, (0, 'kv_group'): 1}
    """
    rounded = dict(counts)
    for key, count in counts.items():
        if key[1] == MLP_CHANNEL and multiple > 1:
            total = totals[key]
            rounded[key] = total - min(total, max(multiple, multiple * round((total - count) / multiple)))
    return rounded


__all__ = ["KV_GROUP", "MLP_CHANNEL", "BlockUnits", "Unit", "block_target_counts", "block_unit_counts",
           "block_units", "check_uniform_session", "choose_units", "lowest_units", "round_channel_counts",
           "round_kept_channels", "stock_group_removals",
           "uniform_target_counts", "uniform_unit_counts"]
