"""Exact math on small tensors: mask selection, Wanda and magnitude against hand-computed masks, SparseGPT's
update against the same mask without it."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.masks import (SparsityPattern, is_valid_n_m, pack_mask, prune_counts, select_n_m, select_unstructured,
                             sparsity_of, unpack_mask)
from hf_sparse.methods import LinearStatistics, build_method
from hf_sparse.methods.sparsegpt import sparsegpt_prune

UNSTRUCTURED = SparsityPattern.parse("unstructured")


def test_prune_counts_are_exact_and_even():
    assert prune_counts([4, 4, 4], 0.5) == [2, 2, 2]
    counts = prune_counts([10] * 7, 0.7)
    assert sum(counts) == 49 and set(counts) == {7}
    counts = prune_counts([256] * 5, 0.7)  # 179.2 per row: the remainder is spread, the total is exact
    assert sum(counts) == round(0.7 * 1280) and set(counts) <= {179, 180}


def test_magnitude_mask_by_hand():
    weight = torch.tensor([[0.1, -3.0, 0.5, 2.0],
                           [-0.2, 0.05, 4.0, -1.0]])
    _, mask = build_method("magnitude").prune_weight(weight, None, UNSTRUCTURED, 0.5)
    # One threshold over the whole matrix: the four smallest |w| are 0.05, 0.1, 0.2, 0.5.
    expected = torch.tensor([[False, True, False, True],
                             [False, False, True, True]])
    assert torch.equal(mask, expected)


def test_wanda_mask_by_hand():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                           [4.0, 3.0, 2.0, 1.0]])
    # Input feature norms ‖X_j‖ = 1, 2, 3, 4 (sq_norm holds their squares).
    stats = LinearStatistics(n_tokens=3, sq_norm=torch.tensor([1.0, 4.0, 9.0, 16.0]))
    _, mask = build_method("wanda").prune_weight(weight, stats, UNSTRUCTURED, 0.5)
    # Scores row 0: 1 2 3 4 -> drop inputs 0,1; row 1: 4 6 6 4 -> drop the two 4s (inputs 0 and 3).
    expected = torch.tensor([[False, False, True, True],
                             [False, True, True, False]])
    assert torch.equal(mask, expected)


def test_wanda_two_four_by_hand():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]])
    stats = LinearStatistics(n_tokens=1, sq_norm=torch.tensor([16.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 16.0]))
    _, mask = build_method("wanda").prune_weight(weight, stats, SparsityPattern.parse("2:4"), 0.5)
    # Scores 4 2 3 4 | 4 3 2 4: keep inputs 0,3 and 4,7.
    assert mask.tolist() == [[True, False, False, True, True, False, False, True]]


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.3])
@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_selection_is_exact(sparsity, per_row):
    scores = torch.rand(37, 53, generator=torch.Generator().manual_seed(1))
    mask = select_unstructured(scores, sparsity, per_row=per_row)
    assert (~mask).sum().item() == round(sparsity * scores.numel())
    # Every removed score is no larger than any kept score of the same comparison group.
    if per_row:
        for row in range(scores.shape[0]):
            assert scores[row][~mask[row]].max() <= scores[row][mask[row]].min()
    else:
        assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_selection_is_valid(n, m):
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(2))
    mask = select_n_m(scores, n, m)
    groups = mask.reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    assert is_valid_n_m(mask, n, m)
    kept = scores.reshape(16, -1, m)
    assert (kept.masked_fill(~groups, float("inf")).min(-1).values >= kept.masked_fill(groups, -1).max(-1).values).all()


def _n_m_by_stable_argsort(scores, n, m):
    """The former select_n_m: a stable argsort inside every group, the m - n first positions pruned."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., : m - n], False)
    return mask.reshape(rows, cols)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2), (4, 8), (2, 8), (7, 8), (8, 16)])
def test_n_m_selection_equals_stable_argsort_with_ties(n, m):
    generator = torch.Generator().manual_seed(n * 100 + m)
    # Few distinct values: most groups hold ties, which the earliest-first rule must break as a stable sort does.
    scores = torch.randint(0, 3, (37, 12 * m), generator=generator).float()
    assert torch.equal(select_n_m(scores, n, m), _n_m_by_stable_argsort(scores, n, m))
    scores[0, :m] = torch.tensor([-0.0, 0.0] * (m // 2))  # signed zeros compare equal
    scores[1, :m] = float("inf")
    assert torch.equal(select_n_m(scores, n, m), _n_m_by_stable_argsort(scores, n, m))
    scores[2, 1] = float("nan")  # sorted last, as the largest score
    assert torch.equal(select_n_m(scores, n, m), _n_m_by_stable_argsort(scores, n, m))


def test_n_m_needs_divisible_inputs():
    with pytest.raises(ValueError, match=r"2:4 pattern needs the input dimension to be a multiple of 4, got 6"):
        select_n_m(torch.rand(2, 6), 2, 4)


def test_pack_roundtrip():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(3)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (65 + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    assert sparsity_of(mask) == pytest.approx(1 - mask.float().mean().item())


def _problem(rows=16, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    # Correlated inputs (a random mixing of independent features) make the OBS update matter.
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    return weight, x  # x: (tokens, in)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_update_beats_same_mask_without_update(pattern):
    weight, x = _problem()
    hessian = x.T @ x
    parsed = SparsityPattern.parse(pattern)
    new_weight, mask = sparsegpt_prune(weight, hessian, parsed, 0.5, block_size=32)
    assert (~mask).sum().item() == weight.numel() // 2
    assert torch.equal(new_weight == 0, ~mask) or ((new_weight == 0) >= ~mask).all()
    if parsed.is_n_m:
        assert is_valid_n_m(mask, 2, 4)
    reference = x @ weight.T  # (tokens, out)
    error_updated = (x @ new_weight.T - reference).norm()
    error_masked_only = (x @ (weight * mask).T - reference).norm()
    assert error_updated < 0.8 * error_masked_only


def test_sparsegpt_without_pruning_leaves_weights():
    weight, x = _problem(seed=1)
    new_weight, mask = sparsegpt_prune(weight, x.T @ x, UNSTRUCTURED, 0.0)
    assert mask.all()
    assert torch.allclose(new_weight, weight, atol=1e-5)
