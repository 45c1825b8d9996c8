"""Block-level edits as data: what a structured method decides, before anything is applied.

A structured method returns a :class:`StructuredEdits`; :func:`hf_sparse.surgery.apply_edits` is the one place that
turns it into smaller modules. Indices always refer to the *original* (dense) model: block ``i`` is the ``i``-th
decoder block before any removal, head ``h`` the ``h``-th query head of that block.

>>> edits = StructuredEdits(blocks={0: BlockEdit(mlp=MLPEdit(kept_channels=(0, 2, 3)))}, removed_blocks=(5,))
>>> edits.blocks[0].mlp.kept_channels
(0, 2, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _check_indices(name: str, indices, size: int | None = None) -> tuple[int, ...]:
    indices = tuple(int(i) for i in indices)
    if list(indices) != sorted(set(indices)):
        raise ValueError(f"{name} must be strictly increasing indices, got {list(indices)}")
    if not indices:
        raise ValueError(f"{name} must keep at least one index")
    if indices[0] < 0 or (size is not None and indices[-1] >= size):
        raise ValueError(f"{name} has indices outside [0, {size}): {list(indices)}")
    return indices


@dataclass(frozen=True)
class AttentionEdit:
    """Which attention heads of one block survive.

    ``kept_kv_heads`` are the key/value heads (GQA groups) kept; ``kept_query_heads`` the query heads kept, each of
    which must belong to a kept group, and every kept group must keep the same number of query heads (the attention
    repeats each key/value head a fixed number of times). ``head_dim`` never changes. For multi-head attention the
    two are equal.

    >>> AttentionEdit.whole_groups((0, 2), heads_per_group=2).kept_query_heads
    (0, 1, 4, 5)
    """

    kept_kv_heads: tuple[int, ...]
    kept_query_heads: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "kept_kv_heads", _check_indices("kept_kv_heads", self.kept_kv_heads))
        object.__setattr__(self, "kept_query_heads", _check_indices("kept_query_heads", self.kept_query_heads))

    @classmethod
    def whole_groups(cls, kept_kv_heads, heads_per_group: int) -> AttentionEdit:
        """Keep whole key/value groups with all their query heads."""
        kept_kv_heads = tuple(kept_kv_heads)
        query = tuple(g * heads_per_group + r for g in kept_kv_heads for r in range(heads_per_group))
        return cls(kept_kv_heads, query)

    def validate(self, num_heads: int, num_kv_heads: int) -> int:
        """Check against the block's original head counts; returns the query heads kept per group."""
        _check_indices("kept_kv_heads", self.kept_kv_heads, num_kv_heads)
        _check_indices("kept_query_heads", self.kept_query_heads, num_heads)
        per_group = num_heads // num_kv_heads
        counts = {g: 0 for g in self.kept_kv_heads}
        for head in self.kept_query_heads:
            group = head // per_group
            if group not in counts:
                raise ValueError(f"query head {head} belongs to key/value head {group}, which is not kept "
                                 f"(kept: {list(self.kept_kv_heads)})")
            counts[group] += 1
        if len(set(counts.values())) != 1:
            raise ValueError(f"every kept key/value head must keep the same number of query heads so that "
                             f"num_attention_heads / num_key_value_heads stays an integer; got {counts}")
        return next(iter(counts.values()))


@dataclass(frozen=True)
class MLPEdit:
    """Which intermediate channels of one block's MLP survive."""

    kept_channels: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "kept_channels", _check_indices("kept_channels", self.kept_channels))


#: The four places a decoder block touches the residual stream, in execution order: the attention block's input (after
#: its full-width norm), its output, the MLP's input and its output.
RESIDUAL_POINTS = ("attention_input", "attention_output", "mlp_input", "mlp_output")


@dataclass(frozen=True)
class ResidualEdit:
    """Which residual-stream dimensions one block reads and writes (DISP-LLM's dimension-independent selections).

    Each field is the kept dimensions at one of :data:`RESIDUAL_POINTS`, or ``None`` for all of them: the attention
    block reads ``attention_input`` of its normed input (q/k/v keep those input columns) and adds its output only into
    ``attention_output`` (o_proj keeps those rows); the MLP likewise with ``mlp_input`` (gate/up columns) and
    ``mlp_output`` (down_proj rows). The norms stay full width, so every block sees the whole stream's statistics.

    >>> ResidualEdit(attention_input=(0, 3)).kept("attention_input", 4)
    (0, 3)
    """

    attention_input: tuple[int, ...] | None = None
    attention_output: tuple[int, ...] | None = None
    mlp_input: tuple[int, ...] | None = None
    mlp_output: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in RESIDUAL_POINTS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_indices(name, value))

    def kept(self, point: str, hidden_size: int) -> tuple[int, ...]:
        """The kept dimensions at ``point``, checked against ``hidden_size`` (all of them when not selected)."""
        value = getattr(self, point)
        return tuple(range(hidden_size)) if value is None else _check_indices(point, value, hidden_size)


@dataclass
class BlockEdit:
    """Everything that changes in one decoder block.

    ``new_biases`` maps a linear's name relative to the block (e.g. ``"mlp.down_proj"``) to a vector added to its
    output bias (created when the linear has none): FLAP's compensation for the removed channels' mean contribution.
    ``residual`` selects the residual-stream dimensions the block reads and writes (:class:`ResidualEdit`).
    """

    attention: AttentionEdit | None = None
    mlp: MLPEdit | None = None
    residual: ResidualEdit | None = None
    new_biases: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StructuredEdits:
    """A structured method's decision for the whole model: per-block edits and whole blocks removed."""

    blocks: dict[int, BlockEdit] = field(default_factory=dict)
    removed_blocks: tuple[int, ...] = ()

    def __post_init__(self):
        self.removed_blocks = tuple(sorted(set(int(i) for i in self.removed_blocks)))
        overlap = set(self.removed_blocks) & {i for i, edit in self.blocks.items() if edit is not None}
        if overlap:
            raise ValueError(f"blocks {sorted(overlap)} are both edited and removed")
