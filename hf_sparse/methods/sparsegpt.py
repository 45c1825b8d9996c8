"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with weight updates through the inverse Hessian.

Columns are processed left to right in blocks; inside a block the mask is chosen (per block for unstructured,
per group of M for N:M) from ``w² / [H⁻¹]_jj²`` and the error of every pruned column is pushed onto the columns
not yet processed, using the upper Cholesky factor of the damped inverse Hessian ``(X Xᵀ + λI)⁻¹``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import SparsityPattern, prune_counts, select_n_m, select_unstructured
from .base import LinearStatistics, MethodOptions, PaperReference, PruningMethod, register_method


#: below this the damped Hessian of a rarely firing input can stay singular: Cholesky fails in the middle of pruning
MIN_DAMPENING = 1e-6


def usable_dampening(name: str, value):
    if isinstance(value, float) and 0 < value < MIN_DAMPENING:
        raise ValueError(f"{name} must be at least {MIN_DAMPENING:g} (smaller values leave the Hessian singular), got "
                         f"{value!r}")
    return value


@dataclass
class SparseGPTOptions(MethodOptions):
    block_size: int = field(default=128, metadata={"help": "Columns processed (and masked) together.", "range": "> 0"})
    dampening: float = field(
        default=0.01,
        metadata={"help": "Added to the Hessian diagonal, as a fraction of its mean diagonal (at least 1e-6).",
                  "range": "(0, 1)", "check": lambda name, value: usable_dampening(name, value)},
    )


def damped_inverse_hessian(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """``(H + λI)⁻¹`` with ``λ = dampening · mean(diag H)``, float64 (H is often badly conditioned: rarely firing
    features, outlier channels).

    Dead inputs (zero diagonal: the feature never fires) get a unit diagonal so the factorisation exists.
    """
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += dampening * diag.mean()
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float,
                             inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of :func:`damped_inverse_hessian` (``inverse``, if the caller has it), in
    ``hessian``'s dtype."""
    if inverse is None:
        inverse = damped_inverse_hessian(hessian, dampening)
    return torch.linalg.cholesky(inverse, upper=True).to(hessian.dtype)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, sparsity: float,
                    block_size: int = 128, dampening: float = 0.01, inverse_cholesky: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) with the SparseGPT update; returns ``(new_weight, keep_mask)``.

    ``inverse_cholesky``: the caller's :func:`inverse_hessian_cholesky` of ``hessian`` with the same ``dampening``,
    when it already has it (FISTA's warm start factors the same matrix); computed here otherwise."""
    w = weight.to(torch.float32).clone()
    rows, cols = w.shape
    dead = torch.diagonal(hessian) == 0
    w[:, dead] = 0  # inputs that are always zero carry no information: their weights are free to drop
    if inverse_cholesky is None:
        inverse_cholesky = inverse_hessian_cholesky(hessian.to(torch.float32), dampening)
    hinv = inverse_cholesky.to(torch.float32)  # (in, in) upper triangular
    mask = torch.ones_like(w, dtype=torch.bool)
    if pattern.is_n_m and block_size % pattern.m:
        block_size = max(pattern.m, block_size - block_size % pattern.m)  # keep N:M groups inside one block
    starts = list(range(0, cols, block_size))
    block_counts = prune_counts([min(block_size, cols - s) * rows for s in starts], sparsity)

    for start, count in zip(starts, block_counts):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()  # (out, b)
        hinv_block = hinv[start:end, start:end]  # (b, b)
        hinv_diag = torch.diagonal(hinv_block)  # (b,)
        errors = torch.zeros_like(w_block)
        if pattern.is_n_m:
            block_mask = torch.ones_like(w_block, dtype=torch.bool)
        else:
            # Exactly `count` weights of this block go: the lowest OBS saliency w² / [H⁻¹]_jj².
            saliency = w_block.pow(2) / hinv_diag.pow(2).unsqueeze(0)
            block_mask = select_unstructured(saliency, count / w_block.numel())
        for j in range(end - start):
            if pattern.is_n_m and j % pattern.m == 0:
                # N:M groups are chosen on the weights as updated so far, as the paper does.
                group = slice(j, j + pattern.m)
                saliency = w_block[:, group].pow(2) / hinv_diag[group].pow(2).unsqueeze(0)
                block_mask[:, group] = select_n_m(saliency, pattern.n, pattern.m)
            column = w_block[:, j]
            quantised = column * block_mask[:, j]
            error = (column - quantised) / hinv_block[j, j]  # (out,)
            # OBS update: spread the removed weight's error over the columns to its right.
            w_block[:, j:] -= error.unsqueeze(1) * hinv_block[j, j:].unsqueeze(0)
            w_block[:, j] = quantised
            errors[:, j] = error
        w[:, start:end] = w_block
        mask[:, start:end] = block_mask
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w * mask, mask


@register_method
class SparseGPTPruning(PruningMethod):
    """Second-order pruning with weight reconstruction; the strongest of the three baselines."""

    name = "sparsegpt"
    display_name = "SparseGPT"
    paper = PaperReference("SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
                           "Frantar and Alistarh", 2023, "https://arxiv.org/abs/2301.00774")
    needs_calibration = True
    supports_patterns = ("unstructured", "n:m")
    options_class = SparseGPTOptions
    statistics = frozenset({"hessian"})

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune(weight, stats.hessian, pattern, sparsity,
                               block_size=self.options.block_size, dampening=self.options.dampening)
