"""FISTAPruner: the solver's math on small exact problems, the statistics the engine hands it, parallel == sequential,
and quality against SparseGPT and Wanda on the real pretrained model (../shared)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_sparse
from conftest import CALIBRATION_TXT, load_pretrained, tiny_llama
from hf_sparse.calibration import load_calibration
from hf_sparse.masks import SparsityPattern, is_valid_n_m, prune_counts
from hf_sparse.methods import METHODS, build_method
from hf_sparse.methods.base import register_method
from hf_sparse.methods.fista import (FistaOptions, FistaPruning, Problem, _least_squares_target, fista,
                                     fista_prune, fista_solve, hard_threshold, largest_eigenvalue, refit_on_mask,
                                     resolved_rounds, soft_threshold)
from hf_sparse.methods.sparsegpt import inverse_hessian_cholesky, sparsegpt_prune


def _problem(out=12, n_in=24, tokens=400, seed=0, correction=True):
    """A random layer problem with correlated features (a badly conditioned G, as real activations give)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=gen) * 0.3 + torch.eye(n_in)
    x = mixing @ torch.randn(n_in, tokens, generator=gen) + 0.5  # (in, T), dense inputs
    x_hat = x + 0.1 * torch.randn(n_in, tokens, generator=gen) if correction else x  # inputs through pruned ops
    weight = torch.randn(out, n_in, generator=gen)
    return weight, x, x_hat


def _stats(weight, x, x_hat):
    """hessian X̂X̂ᵀ, cross XX̂ᵀ and dense_output_sq_norm ‖WX‖², as the engine hands them to FISTA."""
    return x_hat @ x_hat.T, x @ x_hat.T, float((weight.double() @ x.double()).pow(2).sum())


def _layer_problem(weight, x, x_hat):
    hessian, cross, const = _stats(weight, x, x_hat)
    return Problem(hessian, weight @ cross, const, largest_eigenvalue(hessian))


# ----------------------------------------------------------------------------------------------------------------
# Solver math


@pytest.mark.parametrize("lam", [0.0, 5.0, 50.0])
def test_objective_never_increases_and_matches_direct_evaluation(lam):
    weight, x, x_hat = _problem()
    problem = _layer_problem(weight, x, x_hat)
    start = torch.zeros_like(weight)
    solution, history = fista(problem, start, lam, iterations=80, tolerance=0.0)
    assert len(history) > 20
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(history, history[1:])), history
    # The tracked objective is the real one: ½‖ŴX̂ − WX‖² + λ‖Ŵ‖₁ evaluated from explicit products.
    direct = 0.5 * (solution.double() @ x_hat.double() - weight.double() @ x.double()).pow(2).sum() \
        + lam * solution.double().abs().sum()
    assert history[-1] == pytest.approx(float(direct), rel=1e-4)
    assert history[-1] < 0.5 * history[0]


def test_identity_gram_gives_soft_threshold_of_c():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 10, generator=gen) * 3
    problem = Problem(torch.eye(10), target, 0.0, largest_eigenvalue(torch.eye(10)))
    for lam in (0.5, 1.7):
        solution, _ = fista(problem, torch.randn(6, 10, generator=gen), lam, iterations=50, tolerance=0.0)
        torch.testing.assert_close(solution, soft_threshold(target, lam), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precondition", [False, True])
def test_refit_reaches_the_masked_least_squares_solution(precondition):
    weight, x, x_hat = _problem()
    hessian, cross, const = _stats(weight, x, x_hat)
    problem = Problem.build(hessian, weight @ cross, const, precondition)
    mask = hard_threshold(weight, SparsityPattern.parse("2:4"), 0.5)
    refit = refit_on_mask(problem, weight, mask, iterations=200)
    assert torch.equal(refit != 0, mask & (refit != 0)) and not refit[~mask].any()  # nothing outside the mask
    # Each row r solves G_SS w_S = c_S on its own support S: compare with the direct solve in float64.
    gram, target = problem.gram.double(), problem.target.double()
    for row in range(weight.shape[0]):
        support = mask[row]
        direct = torch.linalg.solve(gram[support][:, support], target[row, support])
        torch.testing.assert_close(refit[row, support].double(), direct, rtol=2e-3, atol=2e-3)
    # Few steps already help, and the refit never returns a worse fit than its start.
    start_error = problem.error(weight * mask)
    errors = [problem.error(refit_on_mask(problem, weight, mask, steps)) for steps in (1, 5, 20)]
    assert start_error > errors[0] > errors[1] > errors[2]


def test_jacobi_preconditioning_reaches_the_closed_form_minimiser_of_a_diagonal_problem():
    """G = diag(1, 100): the minimiser of ½ŵGŵᵀ − ŵcᵀ + λ‖ŵ‖₁ is soft-threshold(c_j, λ)/G_jj per input. With
    D = diag G the scaled problem is the identity (L = 1), so one preconditioned step lands on it; the plain step
    1/λ_max(G) = 1/100 still has the slow input far off after as many steps."""
    gram = torch.diag(torch.tensor([1.0, 100.0]))
    target = torch.tensor([[3.0, 250.0], [-0.5, -40.0]])
    lam = 1.0
    expected = torch.tensor([[2.0, 2.49], [0.0, -0.39]])  # (|c| − λ)₊·sign(c) / G_jj
    jacobi = Problem.build(gram, target, 0.0, precondition=True)
    assert jacobi.lipschitz == pytest.approx(1.01)  # the unit-diagonal matrix is I; power iteration's 1% margin
    solved, history = fista(jacobi, torch.zeros(2, 2), lam, iterations=60, tolerance=0.0)
    torch.testing.assert_close(solved, expected, rtol=0, atol=1e-5)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(history, history[1:]))
    plain = Problem.build(gram, target, 0.0, precondition=False)
    few, _ = fista(plain, torch.zeros(2, 2), lam, iterations=5, tolerance=0.0)
    fast, _ = fista(jacobi, torch.zeros(2, 2), lam, iterations=5, tolerance=0.0)
    assert (few - expected).abs().max() > 0.1 > (fast - expected).abs().max()


@pytest.mark.parametrize("lam", [0.0, 20.0])
def test_preconditioned_and_plain_fista_reach_the_same_minimiser(lam):
    """The diagonal metric changes the path, not the problem: both solvers converge to one minimiser."""
    weight, x, x_hat = _problem(out=6, n_in=10, tokens=300)
    x_hat = x_hat * torch.linspace(0.2, 5.0, 10).unsqueeze(1)  # badly scaled inputs, as outlier channels give
    hessian, cross, const = _stats(weight, x, x_hat)
    solutions = []
    for precondition in (False, True):
        problem = Problem.build(hessian.double(), (weight @ cross).double(), const, precondition)
        solution, _ = fista(problem, torch.zeros(6, 10, dtype=torch.float64), lam, iterations=20000, tolerance=1e-13)
        solutions.append(solution)
    torch.testing.assert_close(solutions[1], solutions[0], rtol=0, atol=1e-6)
    if lam:
        assert (solutions[0] == 0).any()  # the ℓ1 term is active: the soft threshold (per input) matters


def test_objective_tolerance_stops_at_the_first_small_decrease():
    weight, x, x_hat = _problem()
    problem = _layer_problem(weight, x, x_hat)
    tol = 1e-3
    _, full = fista(problem, torch.zeros_like(weight), 5.0, iterations=200, tolerance=0.0)
    _, early = fista(problem, torch.zeros_like(weight), 5.0, iterations=200, tolerance=0.0, objective_tolerance=tol)
    decreases = [(a - b) / abs(a) for a, b in zip(early, early[1:])]
    assert len(early) < len(full)  # it stopped early ...
    assert decreases[-1] < tol and all(d >= tol for d in decreases[:-1])  # ... at the first step below the tolerance
    assert early == full[:len(early)]  # and the iterates up to there are the untouched ones
    # As a FistaOptions field it validates its range.
    with pytest.raises(ValueError, match="objective_tolerance must be in"):
        FistaOptions(objective_tolerance=1.5)


def test_support_tolerance_stops_once_the_kept_mask_settles():
    """With ``support`` the solve stops at the first accepted step that leaves the hard-threshold mask (almost)
    unchanged; up to there the iterates are the untouched ones."""
    weight, x, x_hat = _problem(out=8, n_in=32, tokens=400)
    problem = _layer_problem(weight, x, x_hat)
    pattern = SparsityPattern.parse("2:4")
    start = weight.clone()  # dense: the first steps move the mask a lot
    masks = []

    def support(candidate):
        masks.append(hard_threshold(candidate, pattern, 0.5))
        return masks[-1]

    full, _, full_history = fista_solve(problem, start, None, 0.5, 200)
    early, _, early_history = fista_solve(problem, start, None, 0.5, 200, support=support, support_tolerance=0.0)
    assert len(early_history) < len(full_history)
    assert early_history == full_history[:len(early_history)]
    changed = [int((a != b).sum()) for a, b in zip(masks, masks[1:])]
    assert len(changed) >= 2, changed  # it ran several steps before the mask settled
    assert changed[-1] == 0 < min(changed[:-1])  # tolerance 0: it stopped at the first step that kept the mask
    assert torch.equal(hard_threshold(early, pattern, 0.5), masks[-1])  # the mask it stopped on is the final one
    with pytest.raises(ValueError, match="support_tolerance must be in"):
        FistaOptions(support_tolerance=1.0)


def test_fista_solve_reuses_the_given_product():
    weight, x, x_hat = _problem()
    problem = _layer_problem(weight, x, x_hat)
    start = weight * hard_threshold(weight, SparsityPattern.parse("2:4"), 0.5)
    a, a_product, a_history = fista_solve(problem, start, None, 3.0, 15)
    b, _, b_history = fista_solve(problem, start, start @ problem.gram, 3.0, 15)
    assert torch.equal(a, b) and a_history == b_history
    torch.testing.assert_close(a_product, a @ problem.gram, rtol=1e-5, atol=1e-3)


def test_sparsegpt_warm_start_reuses_the_factorisation_exactly():
    """FISTA hands SparseGPT the inverse-Hessian factor from its own Cholesky of the same damped G: same result."""
    weight, x, x_hat = _problem(out=8, n_in=32)
    gram = x_hat @ x_hat.T
    for pattern, sparsity in ((SparsityPattern.parse("2:4"), 0.5), (SparsityPattern("unstructured"), 0.6)):
        own = sparsegpt_prune(weight, gram, pattern, sparsity)
        given = sparsegpt_prune(weight, gram, pattern, sparsity, inverse_cholesky=inverse_hessian_cholesky(gram, 0.01))
        assert torch.equal(own[0], given[0]) and torch.equal(own[1], given[1])


def test_least_squares_target_from_the_float32_product_fits_like_a_float64_solve():
    """W* = C(G + δI)⁻¹ is a float32 product with SparseGPT's float64 inverse: its fit ‖(W* − W*₆₄)X̂‖² is a
    negligible share of the fit it makes, even for badly scaled inputs."""
    weight, x, x_hat = _problem(out=16, n_in=64, tokens=400)
    x_hat = x_hat * torch.logspace(-2, 2, 64).unsqueeze(1)  # four decades between the quietest and loudest input
    gram = x_hat @ x_hat.T
    cross_target = weight @ (x @ x_hat.T)
    target, factor = _least_squares_target(weight, gram, cross_target, 0.01)
    damped = gram.double() + 0.01 * torch.diagonal(gram).double().mean() * torch.eye(64, dtype=torch.float64)
    exact = torch.linalg.solve(damped, cross_target.double().T).T
    difference = (target.double() - exact)
    assert float(torch.trace(difference @ damped @ difference.T)) < 1e-8 * float(torch.trace(exact @ damped @ exact.T))
    torch.testing.assert_close(factor, inverse_hessian_cholesky(gram, 0.01))


def test_rounds_default_to_one_at_n_m_and_two_unstructured_and_the_record_says_which():
    weight, x, x_hat = _problem(out=16, n_in=32, tokens=600)
    stats = _stats(weight, x, x_hat)
    for pattern, sparsity, rounds in ((SparsityPattern.parse("2:4"), 0.5, 1),
                                      (SparsityPattern("unstructured"), 0.6, 2)):
        assert resolved_rounds(FistaOptions(), pattern) == rounds
        assert build_method("fista").recorded_options(pattern)["rounds"] == rounds
        by_default, _ = fista_prune(weight, *stats, pattern, sparsity, FistaOptions())
        explicit, _ = fista_prune(weight, *stats, pattern, sparsity, FistaOptions(rounds=rounds))
        other, _ = fista_prune(weight, *stats, pattern, sparsity, FistaOptions(rounds=3 - rounds))
        assert torch.equal(by_default, explicit) and not torch.equal(by_default, other)
    assert build_method("fista", {"rounds": 3}).recorded_options(SparsityPattern.parse("2:4"))["rounds"] == 3
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="fista", pattern="2:4", calibration=torch.randint(0, 128, (4, 16)),
                                   num_samples=4, sequence_length=16, method_options={"refit_iterations": 2})
    record = hf_sparse.prune(model, cfg, show_progress=False)
    assert record.method_options["rounds"] == 1 and record.method_options["refit_iterations"] == 2


def test_soft_threshold_and_power_iteration():
    assert soft_threshold(torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0]), 1.0).tolist() == [-2.0, 0.0, 0.0, 0.0, 2.0]
    weight, x, x_hat = _problem()
    gram = x_hat @ x_hat.T
    exact = torch.linalg.eigvalsh(gram.double()).max().item()
    # A slight overestimate (1% margin) is what keeps the step 1/L safe.
    assert exact <= largest_eigenvalue(gram) <= 1.02 * exact


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_output_is_valid_in_every_group(pattern):
    parsed = SparsityPattern.parse(pattern)
    weight, x, x_hat = _problem(out=10, n_in=32)
    new_weight, mask = fista_prune(weight, *_stats(weight, x, x_hat), parsed, parsed.implied_sparsity)
    groups = mask.reshape(10, -1, parsed.m).sum(-1)
    assert torch.equal(groups, torch.full_like(groups, parsed.n))  # exactly N kept in every group
    assert is_valid_n_m(new_weight, parsed.n, parsed.m)
    assert torch.equal(new_weight * ~mask, torch.zeros_like(new_weight))


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("shape", [(8, 20), (7, 13)])  # 160 weights: exact counts; 91 weights: 45.5 and 63.7
@pytest.mark.parametrize("per_row", [False, True])
def test_exact_unstructured_sparsity(sparsity, shape, per_row):
    out, n_in = shape
    weight, x, x_hat = _problem(out=out, n_in=n_in)
    options = FistaOptions(per_row=per_row)
    new_weight, mask = fista_prune(weight, *_stats(weight, x, x_hat), SparsityPattern("unstructured"), sparsity, options)
    expected = prune_counts([n_in] * out, sparsity) if per_row else prune_counts([out * n_in], sparsity)
    assert int((~mask).sum()) == sum(expected)
    if per_row:
        assert (~mask).sum(1).tolist() == expected
    assert int((new_weight == 0).sum()) == sum(expected)


def test_fista_improves_its_warm_start_on_the_layer_objective():
    weight, x, x_hat = _problem(out=16, n_in=32, tokens=600)
    problem = _layer_problem(weight, x, x_hat)
    pattern = SparsityPattern.parse("2:4")
    errors = {}
    for init in ("sparsegpt", "wanda", "dense"):
        new_weight, _ = fista_prune(weight, *_stats(weight, x, x_hat), pattern, 0.5, FistaOptions(init=init))
        errors[init] = problem.error(new_weight)
    from hf_sparse.methods.sparsegpt import sparsegpt_prune
    sparsegpt_weight, _ = sparsegpt_prune(weight, x_hat @ x_hat.T, pattern, 0.5)
    assert max(errors.values()) < problem.error(sparsegpt_weight)


def test_ridge_is_the_stated_objective_and_pulls_kept_weights_to_their_dense_values():
    weight, x, x_hat = _problem(out=16, n_in=32, tokens=600)
    stats = _stats(weight, x, x_hat)
    pattern = SparsityPattern.parse("2:4")
    plain, plain_mask = fista_prune(weight, *stats, pattern, 0.5, FistaOptions(ridge=0.0))

    def objective(w, rho):  # ‖ŴX̂ − WX‖² + ρ‖Ŵ − W‖², from explicit products
        return float((w.double() @ x_hat.double() - weight.double() @ x.double()).pow(2).sum()
                     + rho * (w.double() - weight.double()).pow(2).sum())

    rho = 0.1 * float(torch.diagonal(stats[0]).mean())
    ridged, ridged_mask = fista_prune(weight, *stats, pattern, 0.5, FistaOptions(ridge=0.1))
    # Each solution is the better one for its own objective: the ridge changes what is minimised.
    assert objective(ridged, rho) < objective(plain, rho)
    assert objective(plain, 0.0) < objective(ridged, 0.0)
    assert (ridged - weight * ridged_mask).norm() < (plain - weight * plain_mask).norm()
    # A dominant ridge leaves the kept weights at their dense values.
    huge, huge_mask = fista_prune(weight, *stats, pattern, 0.5, FistaOptions(ridge=1e6))
    assert torch.allclose(huge, weight * huge_mask, rtol=1e-3, atol=1e-4)


def test_options_are_validated():
    for bad, match in [({"init": "magnitude"}, "init must be one of"), ({"xi": 1.5}, "xi must be in"),
                       ({"iterations": 0}, "iterations must be an integer >= 1"),
                       ({"error_correction": "yes"}, "error_correction must be True or False"),
                       ({"lambda_factor": 1.0}, "lambda_factor must be a number > 1"),
                       ({"tolerance": -1}, "tolerance must be in"),
                       ({"ridge": -0.1}, "ridge must be a number >= 0")]:
        with pytest.raises(ValueError, match=match):
            FistaOptions(**bad)
        with pytest.raises(ValueError, match=match):
            hf_sparse.SparsityConfig(method="fista", method_options=bad)
    assert build_method("fista").sequential_within_block is True
    assert build_method("fista", {"error_correction": False}).sequential_within_block is False
    assert FistaPruning.propagate_dense


# ----------------------------------------------------------------------------------------------------------------
# The engine hands FISTA the statistics the paper needs


# Fewer solver steps where a test checks the engine's plumbing, not the solution's quality.
QUICK = {"rounds": 2, "iterations": 10, "refit_iterations": 5}


class RecordingFista(FistaPruning):
    """FISTA that keeps a copy of every statistics object the engine hands it."""

    name = "test_recording_fista"
    statistics = FistaPruning.statistics | {"dense_hessian"}  # not needed by FISTA; checked here for other methods
    calls: list = []

    def prune_weight(self, weight, stats, pattern, sparsity):
        type(self).calls.append((weight.shape, copy.deepcopy(stats)))
        return super().prune_weight(weight, stats, pattern, sparsity)


@pytest.fixture
def recording():
    register_method(RecordingFista)
    RecordingFista.calls = []
    yield RecordingFista
    METHODS.pop(RecordingFista.name)


def _inputs_of(model, module, ids):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen).T  # (in, tokens)


@pytest.mark.parametrize("error_correction", [True, False])
def test_engine_statistics_equal_explicit_forward_passes(recording, error_correction):
    """For block 1 (after block 0 was pruned): X is the dense model's input of each operator, X̂ its input with the
    block's earlier operator groups pruned as the engine left them (and block 0 dense: dense propagation)."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method=recording.name, pattern="2:4", calibration=ids,
                                                    num_samples=4, sequence_length=16, batch_size=2,
                                                    method_options={"error_correction": error_correction, **QUICK}),
                    show_progress=False)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert len(recording.calls) == 2 * len(names)
    block_calls = dict(zip(names, recording.calls[len(names):]))  # block 1, in the engine's execution order

    pruned_block = model.model.layers[1]
    method = recording()
    for index, name in enumerate(names):
        shape, stats = block_calls[name]
        module_dense = dense.model.layers[1].get_submodule(name)
        assert shape == module_dense.weight.shape
        x = _inputs_of(dense, module_dense, ids)
        # X̂: the dense model with only block 1's operators of earlier groups replaced by their pruned weights.
        hybrid = copy.deepcopy(dense)
        group_of = {n: g for g, group in enumerate([[0, 1, 2], [3], [4, 5], [6]]) for n in group}
        for other_index, other in enumerate(names):
            if error_correction and group_of[other_index] < group_of[index]:
                hybrid.model.layers[1].get_submodule(other).weight.data.copy_(pruned_block.get_submodule(other).weight)
        x_hat = _inputs_of(hybrid, hybrid.model.layers[1].get_submodule(name), ids)
        if error_correction and group_of[index] > 0:
            assert not torch.allclose(x, x_hat)  # the correction is really there
        assert stats.n_tokens == 64
        torch.testing.assert_close(stats.hessian, x_hat @ x_hat.T, rtol=1e-4, atol=1e-4)
        # C = W·XX̂ᵀ comes as XX̂ᵀ, or for operators narrower at the output (down_proj) as (WX)X̂ᵀ itself.
        dense_weight = module_dense.weight.detach()
        if module_dense.out_features < module_dense.in_features:
            assert method.statistics_for(module_dense) == method.statistics - {"cross"}
            if error_correction and name == "mlp.down_proj":  # alone in its group: no in × in XX̂ᵀ made
                assert stats.cross is None
            torch.testing.assert_close(stats["dense_output_cross"], dense_weight @ x @ x_hat.T, rtol=1e-4, atol=1e-4)
        else:
            assert "dense_output_cross" not in stats.extra
            torch.testing.assert_close(stats.cross, x @ x_hat.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.dense_hessian, x @ x.T, rtol=1e-4, atol=1e-4)
        expected_norm = float((dense_weight.double() @ x.double()).pow(2).sum())
        assert stats.dense_output_sq_norm == pytest.approx(expected_norm, rel=1e-5)


class UnlistedStatisticFista(FistaPruning):
    """A method whose per-operator statistics name one its ``statistics`` does not list."""

    name = "test_unlisted_statistic_fista"

    def statistics_for(self, module):
        return frozenset({"sq_norm"})


def test_per_operator_statistics_must_be_listed_by_the_method():
    register_method(UnlistedStatisticFista)
    try:
        cfg = hf_sparse.SparsityConfig(method=UnlistedStatisticFista.name, pattern="2:4",
                                       calibration=torch.randint(0, 128, (4, 16)), num_samples=4, sequence_length=16)
        with pytest.raises(ValueError, match=r"statistics_for\('model.layers.0.self_attn.q_proj'\) names \['sq_norm'\]"):
            hf_sparse.prune(tiny_llama(), cfg, show_progress=False)
    finally:
        METHODS.pop(UnlistedStatisticFista.name)


def test_blocks_without_targets_pass_through_when_only_later_blocks_are_pruned():
    """Block 0 has nothing to prune (include names block 1 only): it still runs, dense, to feed block 1."""
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    cfg = hf_sparse.SparsityConfig(method="fista", pattern="2:4", calibration=torch.randint(0, 128, (4, 16)),
                                   num_samples=4, sequence_length=16, include=[r"\.layers\.1\."],
                                   method_options=QUICK)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    assert record.overall_sparsity == 0.5
    for (name, before), after in zip(dense.model.layers[0].state_dict().items(),
                                     model.model.layers[0].state_dict().values()):
        assert torch.equal(before, after), name
    assert is_valid_n_m(model.model.layers[1].mlp.down_proj.weight, 2, 4)


def test_parallel_equals_sequential_on_tiny_model():
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for parallel in (False, True):
        model = tiny_llama(num_hidden_layers=4)
        cfg = hf_sparse.SparsityConfig(method="fista", sparsity=0.6, calibration=ids, num_samples=6,
                                       sequence_length=16, batch_size=3, parallel=parallel, num_workers=2,
                                       method_options=QUICK)
        record = hf_sparse.prune(model, cfg, show_progress=False)
        assert record.overall_sparsity == pytest.approx(0.6, abs=1e-3)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


# ----------------------------------------------------------------------------------------------------------------
# The real model


WINDOWS = 100  # first 100 non-overlapping 256-token windows of the WikiText-2 test split
SETTINGS = [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)]


@pytest.fixture(scope="module")
def real_setup(tokenizer, heldout_text):
    calibration = load_calibration(str(CALIBRATION_TXT), tokenizer, num_samples=32, sequence_length=256, seed=0)
    dense = load_pretrained()

    def evaluate(model):
        return hf_sparse.evaluate.perplexity(model, tokenizer, heldout_text, sequence_length=256, batch_size=25,
                                             max_windows=WINDOWS, show_progress=False)

    cache = {}

    def pruned(method, pattern, sparsity, **config):
        key = (method, pattern, sparsity, tuple(sorted(config.items(), key=str)))
        if key not in cache:
            model = copy.deepcopy(dense)
            cfg = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=sparsity, calibration=calibration,
                                           num_samples=32, sequence_length=256, **config)
            record = hf_sparse.prune(model, cfg, show_progress=False)
            # Each module prunes exactly round(sparsity · numel): at 70% that is 9.6 weights more than 0.7 overall.
            assert record.overall_sparsity == pytest.approx(cfg.sparsity, abs=5e-6)
            cache[key] = (model, evaluate(model))
        return cache[key]

    return dense, evaluate, pruned


@pytest.mark.slow
@pytest.mark.parametrize("pattern,sparsity", SETTINGS, ids=["50%", "2:4", "70%"])
def test_fista_beats_sparsegpt_and_wanda(real_setup, pattern, sparsity):
    dense, evaluate, pruned = real_setup
    dense_ppl = evaluate(dense)
    _, fista_ppl = pruned("fista", pattern, sparsity)
    _, sparsegpt_ppl = pruned("sparsegpt", pattern, sparsity)
    _, wanda_ppl = pruned("wanda", pattern, sparsity)
    assert math.isfinite(fista_ppl) and dense_ppl < fista_ppl
    assert fista_ppl < sparsegpt_ppl and fista_ppl < wanda_ppl, (dense_ppl, fista_ppl, sparsegpt_ppl, wanda_ppl)


@pytest.mark.slow
def test_parallel_equals_sequential_on_real_model(real_setup, tokenizer):
    dense, _, _ = real_setup
    calibration = load_calibration(str(CALIBRATION_TXT), tokenizer, num_samples=8, sequence_length=128, seed=1)
    weights = []
    for parallel in (False, True):
        model = copy.deepcopy(dense)
        cfg = hf_sparse.SparsityConfig(method="fista", pattern="2:4", calibration=calibration, num_samples=8,
                                       sequence_length=128, parallel=parallel, num_workers=2,
                                       method_options=QUICK)
        hf_sparse.prune(model, cfg, show_progress=False)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
