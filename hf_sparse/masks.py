"""Sparsity patterns and mask selection.

Every method scores weights (higher score = more important) and hands the scores to this module, which decides
*which* weights go. Keeping selection here is what makes "achieved sparsity equals the target exactly" and
"every N:M group is valid" true for every method at once.

Masks are boolean tensors shaped like the weight, ``True`` where the weight is **kept**.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import shown

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """Where zeros may go: ``unstructured`` (anywhere), ``N:M`` (N kept weights in every group of M inputs), or
    ``structured`` (whole heads, channels or blocks are removed and the matrices become smaller: no zeros at all).

    >>> SparsityPattern.parse("2:4").implied_sparsity
    0.5
    """

    kind: str  # "unstructured" | "n:m" | "structured"
    n: int = 0  # weights kept per group (N:M only)
    m: int = 0  # group size along the input dimension (N:M only)

    @classmethod
    def parse(cls, pattern: str | SparsityPattern) -> SparsityPattern:
        if isinstance(pattern, SparsityPattern):
            return pattern
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a string such as 'unstructured', '2:4' or '4:8', got {shown(pattern)}")
        if pattern.strip().lower() in ("unstructured", "structured"):
            return cls(pattern.strip().lower())
        match = _NM_RE.match(pattern)
        if match is None:
            raise ValueError(f"pattern {shown(pattern)} is not valid: use 'unstructured' or 'N:M' such as '2:4' or '4:8', "
                             "or 'structured' for methods that remove whole heads, channels or blocks")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {shown(pattern)} is not valid: N:M needs 0 < N < M (N weights kept in each group of M)")
        return cls("n:m", n, m)

    @property
    def is_n_m(self) -> bool:
        return self.kind == "n:m"

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (``1 - N/M``); ``None`` for unstructured."""
        return 1.0 - self.n / self.m if self.is_n_m else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_n_m else self.kind

    @property
    def is_structured(self) -> bool:
        return self.kind == "structured"


def prune_counts(group_sizes: list[int], sparsity: float) -> list[int]:
    """How many weights to prune in each group so that the total is exactly ``round(sparsity * sum(sizes))``.

    Cumulative rounding spreads the remainder evenly and deterministically: when ``sparsity * size`` is an integer
    for every group, each group gets exactly that.

    >>> prune_counts([10, 10, 10], 0.25)
    [2, 3, 3]
    """
    counts, cumulative, previous = [], 0, 0
    for size in group_sizes:
        cumulative += size
        target = int(round(sparsity * cumulative))
        counts.append(target - previous)
        previous = target
    return counts


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 1-D score vector with exactly the ``k`` lowest scores removed (stable on ties: of equal scores
    the earliest go first, as a stable sort would order them).

    A selection, not a sort: the k-th smallest value by ``kthvalue`` (linear time), everything below it, then as many
    of the entries equal to it as the count still needs. Whole-matrix thresholds run several times per operator in
    FISTA, where a full sort of every matrix was a large share of the time.

    >>> _lowest_k_mask(torch.tensor([3.0, 1.0, 1.0, 0.5, 1.0]), 3).tolist()
    [True, False, False, False, True]
    """
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.numel():
        return ~mask
    kth = torch.kthvalue(scores, k).values
    below = scores < kth
    mask &= ~below
    still_needed = k - int(below.sum())
    tied = torch.nonzero(scores == kth).squeeze(1)[:still_needed]
    mask[tied] = False
    return mask


def select_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask removing the lowest-scoring ``sparsity`` fraction of ``scores`` (shape ``(out, in)``).

    ``per_row=True`` ranks inside each output row (Wanda's comparison group); otherwise the whole matrix is one
    group (magnitude pruning as its reference code does it). The pruned count is exact in both cases.

    >>> select_unstructured(torch.tensor([[1., 4.], [3., 2.]]), 0.5).tolist()
    [[False, True], [True, False]]
    """
    if per_row:
        rows, cols = scores.shape
        counts = prune_counts([cols] * rows, sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        order = torch.argsort(scores, dim=1, stable=True)  # (out, in) ascending per row
        by_count: dict[int, list[int]] = {}
        for row, k in enumerate(counts):
            by_count.setdefault(k, []).append(row)
        for k, row_ids in by_count.items():
            if k:
                idx = torch.tensor(row_ids, device=scores.device)
                mask[idx.unsqueeze(1), order[idx, :k]] = False
        return mask
    k = prune_counts([scores.numel()], sparsity)[0]
    return _lowest_k_mask(scores.reshape(-1), k).reshape(scores.shape)


#: Largest group size M for which :func:`select_n_m` ranks by pairwise comparisons (M·(M−1) element-wise passes);
#: larger groups are sorted.
_PAIRWISE_MAX_M = 8


def select_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores kept in every group of ``m`` consecutive inputs of each row.

    Of equal scores the earliest is pruned first (the order of a stable ascending sort).

    >>> select_n_m(torch.tensor([[1., 4., 3., 2.]]), 2, 4).tolist()
    [[False, True, True, False]]
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}")
    if m > _PAIRWISE_MAX_M or torch.isnan(scores.sum()):  # (a sum is NaN when any score is; one cheap pass)
        # Large groups, or NaN, which has no place in comparisons (a sort puts it last, as the largest score).
        groups = scores.reshape(rows, cols // m, m)
        order = torch.argsort(groups, dim=-1, stable=True)
        mask = torch.ones_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order[..., : m - n], False)
        return mask.reshape(rows, cols)
    # A score's position in the stable ascending order of its group is the number of members sorting before it:
    # smaller ones, and equal ones further left. It is kept when that position is at least m - n. That is m·(m−1)
    # vectorised comparisons over all groups at once, several times faster than argsort, which sorts every tiny
    # group separately. Buffers are reused: allocating large temporaries costs as much as the comparisons.
    groups = scores.reshape(-1, m)  # (groups, m)
    keep = torch.empty_like(groups, dtype=torch.bool)
    position = torch.empty(groups.shape[0], dtype=torch.uint8, device=scores.device)
    sorts_before = torch.empty(groups.shape[0], dtype=torch.bool, device=scores.device)
    for i in range(m):
        position.zero_()
        for j in range(m):
            if j != i:
                (torch.le if j < i else torch.lt)(groups[:, j], groups[:, i], out=sorts_before)
                position += sorts_before
        torch.ge(position, m - n, out=keep[:, i])
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, pattern: SparsityPattern, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Dispatch to :func:`select_n_m` or :func:`select_unstructured` for ``pattern``."""
    if pattern.is_n_m:
        return select_n_m(scores, pattern.n, pattern.m)
    return select_unstructured(scores, sparsity, per_row=per_row)


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros in ``tensor`` (a weight) or of ``False`` in a keep-mask."""
    if tensor.dtype == torch.bool:
        return 1.0 - tensor.sum().item() / tensor.numel()
    return (tensor == 0).sum().item() / tensor.numel()


def is_valid_n_m(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """True when no group of ``m`` consecutive inputs in any row keeps more than ``n`` non-zeros."""
    kept = mask_or_weight if mask_or_weight.dtype == torch.bool else mask_or_weight != 0
    rows, cols = kept.shape
    if cols % m:
        return False
    return bool((kept.reshape(rows, cols // m, m).sum(-1) <= n).all())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into uint8 bits (8x smaller), row-major; see :func:`unpack_mask`."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.reshape(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=packed.device)
    flat = (packed.unsqueeze(-1) & bits).ne(0).reshape(-1)
    numel = 1
    for dim in shape:
        numel *= dim
    return flat[:numel].reshape(shape)
