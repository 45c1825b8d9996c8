"""FISTAPruner (Zhao et al., 2024, arXiv 2408.03728): layer-wise pruning as an ℓ1-regularised convex problem.

For every linear operator with dense weight ``W`` (out, in) the method solves

    min_Ŵ  ½‖Ŵ X̂ − W X‖²_F + λ‖Ŵ‖₁                 (+ ½ρ‖Ŵ − W‖²_F with ``ridge``, our addition)

where ``X`` is the operator's input in the dense block and ``X̂`` its input after the block's earlier operators were
pruned (*intra-layer error correction*: later operators repair what earlier ones lost). The ridge term keeps the
kept weights near their dense values: a fit to a few thousand calibration tokens otherwise overfits them. Everything
reduces to two matrices computed once per operator, ``G = X̂X̂ᵀ`` and ``C = W·XX̂ᵀ`` (with the ridge ``G + ρI`` and
``C + ρW``; the gradient is ``ŴG − C``), and is solved by
FISTA: a gradient step of size ``1/L`` (``L = λ_max(G)``), soft-thresholding, Nesterov momentum, and a momentum restart
whenever the objective would rise (so the objective never increases). A hard threshold then keeps exactly the target
number of weights (unstructured or N:M, through :mod:`hf_sparse.masks`), and the kept weights are refit by least
squares on the fixed mask (a few conjugate-gradient steps, every output row at once).

``λ`` can be tuned per operator by bisection over ``rounds`` (by default 2 unstructured, 1 for N:M): if the hard
threshold adds more than ``xi`` of the total reconstruction error the FISTA solution was too dense (raise λ),
otherwise lower it. The best solution (smallest reconstruction error after the hard threshold, the warm start
included) is kept, and each round warm-starts from the best one so far.

Every block is fed the dense model's activations (``propagate_dense``), so blocks are independent and can be pruned
in parallel (``SparsityConfig(parallel=True)``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..masks import SparsityPattern, select_mask
from .base import LinearStatistics, MethodOptions, PaperReference, PruningMethod, register_method
from .sparsegpt import usable_dampening, damped_inverse_hessian, inverse_hessian_cholesky, sparsegpt_prune
from .wanda import WandaPruning

logger = logging.getLogger(__name__)

INITS = ("sparsegpt", "wanda", "dense")



@dataclass
class FistaOptions(MethodOptions):
    init: str = field(
        default="sparsegpt",
        metadata={"help": "Warm start of the first round: 'sparsegpt' (SparseGPT on the least-squares target "
                          "C·G⁻¹, i.e. with the intra-block correction), 'wanda' (W masked by the Wanda score) or "
                          "'dense' (W itself).", "choices": INITS},
    )
    error_correction: bool = field(
        default=True,
        metadata={"help": "Intra-block error correction: prune a block's operators in execution order, each fitted "
                          "on inputs through the already-pruned ones (X̂). False takes every input from the dense "
                          "block (X̂ = X), the paper's ablation."},
    )
    iterations: int = field(default=20, metadata={"help": "Maximum FISTA iterations per λ round.", "range": ">= 1"})
    rounds: int | None = field(
        default=None,
        metadata={"help": "Rounds of the λ bisection per operator (one FISTA solve each, the next from the best so "
                          "far). None: 1 for N:M patterns, where a second round changes no layer error and costs "
                          "about a tenth of the pruning time at 1024/2752 widths (on SmolLM2 2:4 perplexity is equal "
                          "within the ±0.5% that float rounding alone moves it), and 2 unstructured, where the λ "
                          "search does more. The record states the number that ran.", "range": ">= 1"},
    )
    tolerance: float = field(
        default=1e-4, metadata={"help": "Stop a FISTA solve when ‖Ŵ_k+1 − Ŵ_k‖_F / ‖Ŵ_k‖_F falls below this.",
                                   "range": "[0, 1)"}
    )
    support_tolerance: float = field(
        default=1e-4,
        metadata={"help": "N:M only: also stop a FISTA solve when one step changes the hard-threshold mask of the "
                          "iterate in at most this share of the weights (the kept weights are refitted on that mask "
                          "afterwards, so steps that no longer move it buy little); 0 disables the test. Unstructured "
                          "masks are not tested: a whole-matrix selection costs 0.8-4.8 solver steps on a CPU.",
                 "range": "[0, 1)"},
    )
    objective_tolerance: float = field(
        default=0.0,
        metadata={"help": "Also stop a FISTA solve when one step lowers the objective ½‖ŴX̂ − WX‖² + λ‖Ŵ‖₁ by less "
                          "than this fraction of its value; 0 disables the test.", "range": "[0, 1)"},
    )
    xi: float = field(
        default=0.3,
        metadata={"help": "Target share of the reconstruction error that the hard threshold may add; above it λ is "
                          "raised, below it lowered.", "range": "(0, 1)"},
    )
    lambda_init: float = field(
        default=1.0,
        metadata={"help": "First λ, relative to the λ at which a diagonal G would give exactly the target sparsity "
                          "(the sparsity-quantile of |W|·diag G).", "range": "> 0"},
    )
    lambda_factor: float = field(
        default=4.0, metadata={"help": "λ is multiplied or divided by this until the bisection has a bracket.",
                                  "range": "> 1"}
    )
    restart: bool = field(
        default=True,
        metadata={"help": "Restart the momentum (and reject the step) whenever the objective would rise, which makes "
                          "the objective monotone."},
    )
    refit_iterations: int = field(
        default=15,
        metadata={"help": "Conjugate-gradient iterations refitting the kept weights by least squares on the final "
                          "mask; 0 disables the refit.", "range": ">= 0"},
    )
    per_row: bool = field(
        default=False,
        metadata={"help": "Unstructured only: hard-threshold inside each output row instead of the whole matrix."},
    )
    dampening: float = field(
        default=0.01,
        metadata={"help": "Diagonal dampening (fraction of mean diag G) for the SparseGPT warm start and the "
                          "least-squares target C·G⁻¹ (at least 1e-6).", "range": "(0, 1)",
                  "check": lambda name, value: usable_dampening(name, value)},
    )
    ridge: float = field(
        default=0.03,
        metadata={"help": "Adds ρ‖Ŵ − W‖² to the objective, ρ = ridge · mean diag G, pulling the kept weights towards "
                          "their dense values. A least-squares fit on a few thousand calibration tokens overfits "
                          "them (on SmolLM2 its error on other windows is 1.7× its calibration error); the ridge "
                          "gives up a little of the calibration fit for a better fit elsewhere. 0 disables it (the "
                          "paper's objective).",
                 "range": ">= 0"},
    )
    power_iterations: int = field(
        default=50, metadata={"help": "Most power-iteration steps estimating L = λ_max(G) (it stops earlier once the "
                                      "estimate changes by less than 1e-7 relative).", "range": ">= 1"})
    precondition: bool = field(
        default=True,
        metadata={"help": "Diagonal (Jacobi) preconditioning of the FISTA steps and the refit: input j takes the step "
                          "1/(L·G_jj) with L = λ_max(D^-½ G D^-½), D = diag G. The problem and its minimiser are "
                          "unchanged; badly scaled inputs (outlier channels) no longer force a tiny step on the rest."},
    )


# ----------------------------------------------------------------------------------------------------------------
# The convex problem and its solver


def soft_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Proximal operator of ``threshold·‖·‖₁``: shrink every entry towards zero by ``threshold`` (a number, or a
    tensor broadcast against ``x``, e.g. one threshold per input column).

    Written as ``x − clamp(x, −t, t)``, which equals ``sign(x)·max(|x| − t, 0)`` in two passes over memory instead of
    five (the solver's inner loop is memory-bound on small operators).

    >>> soft_threshold(torch.tensor([-3.0, 0.5, 2.0]), 1.0).tolist()
    [-2.0, 0.0, 1.0]
    """
    return x - x.clamp(-threshold, threshold)


def largest_eigenvalue(gram: torch.Tensor, iterations: int = 50, tolerance: float = 1e-7) -> float:
    """λ_max of a symmetric PSD matrix by power iteration from the all-ones vector (deterministic), at most
    ``iterations`` steps, stopping once the Rayleigh quotient changes by less than ``tolerance`` (relative).

    Power iteration approaches λ_max from below; a step ``1/L`` slightly too long is caught by the monotone
    restart, and a 1% margin makes it rare.

    >>> round(largest_eigenvalue(torch.diag(torch.tensor([1.0, 3.0, 2.0]))), 3)
    3.03
    """
    vector = torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)
    g = gram.to(torch.float64)
    value = 0.0
    for _ in range(iterations):
        product = g @ vector
        norm = product.norm()
        if norm == 0:
            return 1.0  # G = 0: any step works, nothing can be fitted
        previous, value = value, float(vector @ product / (vector @ vector))
        vector = product / norm
        if value - previous <= tolerance * value:  # the quotient rises towards λ_max: converged
            break
    value = max(value, float(vector @ (g @ vector)))
    return 1.01 * value


@dataclass
class Problem:
    """``½‖ŴX̂ − WX‖²`` in Gram form: ``½ tr(ŴGŴᵀ) − tr(ŴCᵀ) + ½ const``; float32 tensors, (out, in) and (in, in).

    ``diagonal`` (optional, (in,)) is a diagonal metric ``D`` for the solvers: gradient steps are ``1/(L·D_jj)`` per
    input ``j`` and ``lipschitz`` is then ``L ≥ λ_max(D^-½ G D^-½)``, so ``½ΔGΔᵀ ≤ ½L·ΔDΔᵀ`` still holds and every
    step is safe. It changes how fast the solvers get there, never the problem or its minimiser.
    """

    gram: torch.Tensor  # G = X̂X̂ᵀ               (in, in)
    target: torch.Tensor  # C = W·XX̂ᵀ            (out, in)
    const: float  # tr(W·XXᵀ·Wᵀ) = ‖WX‖²
    lipschitz: float  # L ≥ λ_max(G), or λ_max(D^-½ G D^-½) with a diagonal metric
    diagonal: torch.Tensor | None = None  # D (in,), positive; None: the identity

    @classmethod
    def build(cls, gram: torch.Tensor, target: torch.Tensor, const: float, precondition: bool = False,
              power_iterations: int = 50) -> "Problem":
        """The problem with ``L`` estimated by power iteration; ``precondition`` takes ``D = diag G`` (Jacobi;
        inputs that never fire get 1: their gradient is zero, so any positive step leaves them alone)."""
        if not precondition:
            return cls(gram, target, const, largest_eigenvalue(gram, power_iterations))
        diagonal = torch.diagonal(gram).clone()
        diagonal[diagonal <= 0] = 1.0
        inverse_sqrt = diagonal.rsqrt()
        scaled = gram * inverse_sqrt.unsqueeze(0) * inverse_sqrt.unsqueeze(1)
        return cls(gram, target, const, largest_eigenvalue(scaled, power_iterations), diagonal)

    @property
    def step(self) -> float | torch.Tensor:
        """Gradient step: ``1/L``, or the row ``1/(L·D)`` of shape (1, in) with a diagonal metric."""
        if self.diagonal is None:
            return 1.0 / self.lipschitz
        return (1.0 / (self.lipschitz * self.diagonal)).unsqueeze(0)

    def error(self, weight: torch.Tensor, product: torch.Tensor | None = None) -> float:
        """``‖ŴX̂ − WX‖²_F`` = ⟨Ŵ, ŴG − 2C⟩ + const. Summed in float64: it is a small difference of large terms.
        (The element-wise products stay float32: ŴG itself carries float32 rounding, so widening them first would
        only cost time.)"""
        if product is None:
            product = weight @ self.gram
        return float(torch.sum(weight * (product - 2.0 * self.target), dtype=torch.float64)) + self.const


def fista(problem: Problem, start: torch.Tensor, lam: float, iterations: int, tolerance: float = 0.0,
          restart: bool = True, objective_tolerance: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """FISTA on ``½‖ŴX̂ − WX‖² + lam·‖Ŵ‖₁`` from ``start``; returns ``(Ŵ, objective per iterate)``.

    One ``(out,in)@(in,in)`` product per iteration: ``ŶG`` is a linear
    combination of the last two iterates' products, which also give the objective. With ``restart`` a step that
    would raise the objective is rejected and the momentum reset, so the returned objectives never increase.
    Stops early when the iterate moves by less than ``tolerance`` (relative, Frobenius) or the objective falls by
    less than ``objective_tolerance`` of its value in one accepted step.

    >>> g = torch.eye(3); c = torch.tensor([[2.0, -0.5, 1.0]])  # G = I: the minimiser is soft-threshold(C, lam)
    >>> w, _ = fista(Problem(g, c, 0.0, 1.0), torch.zeros(1, 3), lam=1.0, iterations=5)
    >>> w.tolist() == [[1.0, 0.0, 0.0]]
    True
    """
    solution, _, history = fista_solve(problem, start, None, lam, iterations, tolerance, restart, objective_tolerance)
    return solution, history


def fista_solve(problem: Problem, start: torch.Tensor, start_product: torch.Tensor | None, lam: float,
                iterations: int, tolerance: float = 0.0, restart: bool = True, objective_tolerance: float = 0.0,
                support: Callable[[torch.Tensor], torch.Tensor] | None = None, support_tolerance: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """:func:`fista` that also takes ``start·G`` when the caller has it and returns ``(Ŵ, Ŵ·G, objectives)``.

    ``support`` maps an iterate to the mask the caller will keep (its hard threshold); with it the solve also stops
    once an accepted step changes that mask in at most ``support_tolerance`` of the weights."""
    step = problem.step
    current = start.clone()
    current_product = current @ problem.gram if start_product is None else start_product
    previous, previous_product = current, current_product
    current_l1 = _l1(current)
    history = [0.5 * problem.error(current, current_product) + lam * current_l1]
    t = 1.0
    last_support = support(current) if support is not None else None
    for _ in range(iterations):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_next
        # Nesterov extrapolation Ŷ = Z + β(Z − Z_prev) and its gradient ŶG − C, both as one lerp each: ŶG is the
        # same combination of the last two iterates' products, so no extra matrix product is needed.
        point = torch.lerp(previous, current, 1.0 + beta)
        gradient = torch.lerp(previous_product, current_product, 1.0 + beta).sub_(problem.target)
        if isinstance(step, float):
            candidate = point.sub_(gradient, alpha=step)
        else:
            candidate = point.sub_(gradient.mul_(step))
        if lam > 0:
            candidate = soft_threshold(candidate, lam * step)
        candidate_product = candidate @ problem.gram
        # Exact change of the quadratic part, free of the cancellation between its large terms:
        # f(Z') − f(Z) = ⟨Z' − Z, ½(Z'G + ZG) − C⟩ because G is symmetric.
        difference = candidate - current
        midpoint_gradient = torch.add(candidate_product, current_product).mul_(0.5).sub_(problem.target)
        candidate_l1 = _l1(candidate)
        delta = float(torch.vdot(difference.reshape(-1), midpoint_gradient.reshape(-1))) \
            + lam * (candidate_l1 - current_l1)
        if restart and delta > 0:
            if t == 1.0:
                break  # a plain proximal step from `current` did not help: converged to float precision
            # Reject the step and restart the momentum: the next step is a plain proximal-gradient step from the
            # current iterate, which cannot raise the objective (its step is within the Lipschitz bound).
            previous, previous_product, t = current, current_product, 1.0
            continue
        change = float(torch.linalg.vector_norm(difference)) / max(float(torch.linalg.vector_norm(current)), 1e-30)
        previous, previous_product = current, current_product
        current, current_product, current_l1, t = candidate, candidate_product, candidate_l1, t_next
        history.append(history[-1] + delta)
        if change < tolerance or -delta < objective_tolerance * abs(history[-2]):
            break
        if support is not None:
            new_support = support(current)
            moved = int(torch.count_nonzero(new_support != last_support))
            last_support = new_support
            if moved <= support_tolerance * new_support.numel():
                break  # the mask has settled: further steps would only be refitted away
    return current, current_product, history


def refit_on_mask(problem: Problem, weight: torch.Tensor, mask: torch.Tensor, iterations: int,
                  product: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares refit of the kept weights on a fixed support: minimise ``‖ŴX̂ − WX‖²`` over Ŵ with zeros
    outside ``mask``, by conjugate gradients run on every output row at once (rows are independent problems
    ``G_SS ŵ_S = c_S``), preconditioned by ``problem.diagonal`` when it has one (Jacobi PCG: same solution). One
    ``(out,in)@(in,in)`` product per iteration, like a FISTA step, but CG is optimal for a quadratic: 10 CG steps
    fit about as well as 25 projected-gradient ones. Never returns a worse fit than ``weight``. ``product``, if
    given, is ``(weight·mask)·G``.

    >>> g = torch.diag(torch.tensor([1.0, 2.0, 4.0])); c = torch.tensor([[1.0, 2.0, 4.0]])
    >>> refit = refit_on_mask(Problem(g, c, 21.0, 4.0), torch.zeros(1, 3), torch.tensor([[True, False, True]]), 3)
    >>> [round(v, 4) for v in refit[0].tolist()]
    [1.0, 0.0, 1.0]
    """
    mask = mask.to(weight.dtype)
    current = weight * mask
    # `product` is updated in place below: never the caller's tensor.
    product = current @ problem.gram if product is None else product.clone()
    start_error = problem.error(current, product)
    inverse_diagonal = None if problem.diagonal is None else problem.diagonal.reciprocal().unsqueeze(0)
    residual = (problem.target - product).mul_(mask)  # −gradient on the support, per row
    preconditioned = residual if inverse_diagonal is None else residual * inverse_diagonal
    direction = preconditioned.clone()
    residual_dot = torch.linalg.vecdot(residual, preconditioned).unsqueeze(1)  # (out, 1)
    # The loop updates in place (addcmul_, mul_): on a CPU a fresh (out, in) temporary per operation costs about as
    # much as the element-wise work itself, and these updates are a third of a refit step besides the product.
    for _ in range(iterations):
        direction_product = direction @ problem.gram
        # The residual, hence the direction, is zero off the mask, so ⟨d, dG⟩ needs no masking.
        curvature = torch.linalg.vecdot(direction, direction_product).unsqueeze(1)
        # Rows already solved (or with nothing left to fit) have zero curvature: they take no step.
        alpha = torch.where(curvature > 0, residual_dot / curvature.clamp_min(1e-30), torch.zeros_like(curvature))
        current.addcmul_(alpha, direction)
        product.addcmul_(alpha, direction_product)  # = current·G, tracked for the final error
        residual.addcmul_(alpha, direction_product.mul_(mask), value=-1.0)
        preconditioned = residual if inverse_diagonal is None else torch.mul(residual, inverse_diagonal)
        new_residual_dot = torch.linalg.vecdot(residual, preconditioned).unsqueeze(1)
        beta = torch.where(residual_dot > 0, new_residual_dot / residual_dot.clamp_min(1e-30),
                           torch.zeros_like(residual_dot))
        direction.mul_(beta).add_(preconditioned)
        residual_dot = new_residual_dot
    # CG decreases the quadratic in exact arithmetic; in float32 on an ill-conditioned G keep the start if it lost.
    return current if problem.error(current, product) <= start_error else weight * mask


def _l1(weight: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(weight, ord=1))


def hard_threshold(weight: torch.Tensor, pattern: SparsityPattern, sparsity: float, per_row: bool = False
                   ) -> torch.Tensor:
    """Keep-mask with exactly the target count: smallest magnitudes zeroed (unstructured) or the ``N`` largest of
    every ``M`` inputs kept (N:M).

    >>> hard_threshold(torch.tensor([[0.1, -3.0, 2.0, 0.0]]), SparsityPattern.parse("2:4"), 0.5).tolist()
    [[False, True, True, False]]
    """
    return select_mask(weight.abs(), pattern, sparsity, per_row=per_row)


def _least_squares_target(weight: torch.Tensor, gram: torch.Tensor, cross_target: torch.Tensor,
                          dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``W* = C (G + δI)⁻¹``, the dense minimiser of ``‖ŴX̂ − WX‖²`` (damped), so that
    ``‖ŴX̂ − WX‖² = ‖(Ŵ − W*)X̂‖² + const``: pruning W* against G is pruning W against the corrected objective.

    Also returns the upper Cholesky factor of ``(G + δI)⁻¹`` that SparseGPT needs (its damping), from the same
    inverse. The inverse is SparseGPT's float64 one; the product with it is float32, which is twice as fast and
    only has to be a good warm start: every candidate is measured on the exact objective afterwards."""
    inverse = damped_inverse_hessian(gram, dampening)
    solution = cross_target.to(torch.float32) @ inverse.to(torch.float32)  # (out, in)
    solution[:, torch.diagonal(gram) == 0] = 0  # inputs that never fire: nothing to fit
    return solution.to(weight.dtype), inverse_hessian_cholesky(gram, dampening, inverse)


def warm_start(weight: torch.Tensor, problem: Problem, pattern: SparsityPattern, sparsity: float,
               options: FistaOptions) -> torch.Tensor:
    """The first round's start, as ``options.init`` says: SparseGPT on the least-squares target ``C·G⁻¹`` (already
    pruned to the target), ``W`` masked by the Wanda score, or ``W`` itself.
    (``examples/fista_layer_study.py`` compares final masks with this one to see what the λ rounds changed.)"""
    if options.init == "dense":
        return weight.clone()
    if options.init == "wanda":
        stats = LinearStatistics(n_tokens=0, sq_norm=torch.diagonal(problem.gram).clone())
        _, mask = WandaPruning().prune_weight(weight, stats, pattern, sparsity)
        return weight * mask
    target, inverse_cholesky = _least_squares_target(weight, problem.gram, problem.target, options.dampening)
    pruned, _ = sparsegpt_prune(target, problem.gram, pattern, sparsity, dampening=options.dampening,
                                inverse_cholesky=inverse_cholesky)
    return pruned


def resolved_rounds(options: FistaOptions, pattern: SparsityPattern) -> int:
    """The λ rounds that run: ``options.rounds``, or when it is None one for N:M (a second changes no layer error
    there, see the README's "The second λ round at N:M") and two unstructured."""
    if options.rounds is not None:
        return options.rounds
    return 1 if pattern.is_n_m else 2


def cross_target(weight: torch.Tensor, stats: LinearStatistics) -> torch.Tensor:
    """``C = W·XX̂ᵀ`` (out, in) from the engine's statistics of one operator: collected as it is
    (``dense_output_cross``, see :meth:`FistaPruning.statistics_for`) or as ``XX̂ᵀ`` times the weight."""
    target = stats.extra.get("dense_output_cross")
    return target.to(torch.float32) if target is not None else weight.to(torch.float32) @ stats.cross.float()


def fista_prune(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor | None, dense_output_sq_norm: float,
                pattern: SparsityPattern, sparsity: float, options: FistaOptions | None = None,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) with FISTAPruner; returns ``(new_weight, keep_mask)``.

    ``hessian`` is X̂X̂ᵀ and ``cross`` is XX̂ᵀ (both (in, in), summed over tokens); ``dense_output_sq_norm`` is
    ‖WX‖², the constant that makes the reconstruction error absolute (the λ rule compares errors as shares).
    ``target``, if given, is ``C = W·XX̂ᵀ`` itself (out, in), and ``cross`` is then not read.

    >>> x = torch.randn(16, 200); w = torch.randn(8, 16)
    >>> new, mask = fista_prune(w, x @ x.T, x @ x.T, float((w @ x).pow(2).sum()), SparsityPattern.parse("2:4"), 0.5)
    >>> mask.sum().item()
    64
    """
    options = options or FistaOptions()
    weight = weight.to(torch.float32)
    gram = hessian.to(torch.float32)
    if target is None:
        if cross is None:
            raise ValueError("fista_prune needs cross (XX̂ᵀ) or target (W·XX̂ᵀ)")
        target = weight @ cross.to(torch.float32)  # C = W·XX̂ᵀ, (out, in)
    else:
        target = target.to(torch.float32)
    const = float(dense_output_sq_norm)
    if options.ridge:
        # ρ‖Ŵ − W‖² = ρ tr(ŴŴᵀ) − 2ρ tr(ŴWᵀ) + ρ‖W‖²: the Gram form absorbs it as G + ρI, C + ρW, const + ρ‖W‖².
        rho = options.ridge * float(torch.diagonal(gram).mean())
        gram = gram.clone()  # `hessian` may be this very tensor: it is the caller's
        gram.diagonal().add_(rho)
        target = target + rho * weight
        const += rho * float(weight.pow(2).sum(dtype=torch.float64))
    problem = Problem.build(gram, target, const, options.precondition, options.power_iterations)

    def support(candidate):
        return hard_threshold(candidate, pattern, sparsity, options.per_row)

    def rounded(candidate):
        mask = support(candidate)
        kept = candidate * mask
        product = kept @ problem.gram
        return kept, mask, problem.error(kept, product), product

    start = warm_start(weight, problem, pattern, sparsity, options)
    best_weight, best_mask, best_error, best_product = rounded(start)
    # The warm start is usually already sparse (SparseGPT, Wanda): then its product is the one just computed.
    best_start = start
    best_start_product = best_product if torch.equal(best_weight, start) else None
    # λ scale: with G diagonal the solution is soft-threshold(W*, λ/G_jj); this λ gives the target sparsity there.
    scores = (weight * torch.diagonal(gram).unsqueeze(0)).abs().reshape(-1)
    k = min(scores.numel() - 1, max(0, int(round(sparsity * scores.numel()))))
    lam = options.lambda_init * float(torch.kthvalue(scores.cpu(), k + 1).values.clamp_min(1e-12))
    low = high = None  # λ bracket: low adds too much at the threshold (too dense), high is too sparse
    for round_index in range(resolved_rounds(options, pattern)):
        solution, solution_product, _ = fista_solve(
            problem, best_start, best_start_product, lam, options.iterations, options.tolerance, options.restart,
            options.objective_tolerance, support if options.support_tolerance and pattern.is_n_m else None,
            options.support_tolerance)
        kept, mask, error, kept_product = rounded(solution)
        fit_error = problem.error(solution, solution_product)
        ratio = (error - fit_error) / max(error, 1e-30)  # share of the error the hard threshold added
        logger.debug("fista round %d: lambda=%.4g fit=%.5g rounded=%.5g ratio=%.3f", round_index, lam, fit_error,
                     error, ratio)
        if error < best_error:
            best_weight, best_mask, best_error, best_product = kept, mask, error, kept_product
            best_start, best_start_product = solution, solution_product
        if ratio > options.xi:
            low = lam
        else:
            high = lam
        if low is not None and high is not None:
            lam = math.sqrt(low * high)
        else:
            lam = lam * options.lambda_factor if high is None else lam / options.lambda_factor
    if options.refit_iterations:
        best_weight = refit_on_mask(problem, best_weight, best_mask, options.refit_iterations, best_product)
    return best_weight * best_mask, best_mask


@register_method
class FistaPruning(PruningMethod):
    """FISTAPruner: ℓ1-regularised layer-wise reconstruction with intra-block error correction, solved by FISTA."""

    name = "fista"
    display_name = "FISTAPruner"
    paper = PaperReference("A Convex-optimization-based Layer-wise Post-training Pruner for Large Language Models",
                           "Zhao, Hu, Li, Zheng, Wang and Yuan", 2024, "https://arxiv.org/abs/2408.03728")
    needs_calibration = True
    supports_patterns = ("unstructured", "n:m")
    options_class = FistaOptions
    statistics = frozenset({"hessian", "cross", "dense_output_cross", "dense_output_sq_norm"})
    propagate_dense = True

    def statistics_for(self, module: nn.Module) -> frozenset[str]:
        # C = W·XX̂ᵀ from XX̂ᵀ costs in² per token (shared by operators reading one input, like gate/up) plus a
        # product; as (WX)X̂ᵀ it costs out·in per token, from W·X the dense block computes anyway. The second is
        # cheaper where the operator narrows (down_proj: a third of the multiply-adds).
        narrowing = module.out_features < module.in_features
        return self.statistics - {"cross" if narrowing else "dense_output_cross"}

    @property
    def sequential_within_block(self) -> bool:
        return self.options.error_correction

    def recorded_options(self, pattern: SparsityPattern) -> dict:
        return {**super().recorded_options(pattern), "rounds": resolved_rounds(self.options, pattern)}

    def prune_weight(self, weight: torch.Tensor, stats: LinearStatistics | None, pattern: SparsityPattern,
                     sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        return fista_prune(weight, stats.hessian, None, stats.dense_output_sq_norm, pattern, sparsity, self.options,
                           target=cross_target(weight, stats))
