"""Where FISTAPruner's result comes from, operator by operator: the warm start, the λ rounds, the refit.

Perplexity moves by about 1% between FISTA settings whose layer errors are equal to a few tenths of a percent, so
settings cannot be told apart by perplexity on one calibration seed. This script looks one level down. It collects the
FISTA problems of a few decoder blocks of a model exactly as ``method="fista"`` sees them (``G = X̂X̂ᵀ``,
``C = W·XX̂ᵀ``, ``‖WX‖²``, with the intra-block error correction of the default options), then solves every problem
again with each ``--setting`` and prints, per setting:

- the reconstruction error ``‖ŴX̂ − WX‖² / ‖WX‖²`` averaged over the operators, and its geometric-mean ratio to the
  first setting's;
- the share of kept-mask entries equal to the warm start's mask (SparseGPT on the corrected target), the lowest over
  the operators and the mean: 1.000 everywhere means the λ rounds changed nothing and the result is the warm start
  refitted on its own mask;
- the solver's seconds for all operators (one thread unless ``--threads``);
- with ``--holdout-seed S``, the same error measured on other calibration windows (the problems of the same blocks
  collected from calibration seed ``S``): how well each setting's weights fit tokens they were not fitted on. A
  setting that fits the calibration windows better but the held-out ones worse is overfitting them.

    python examples/fista_layer_study.py --model smollm2 --blocks 3,15,27 --pattern 2:4 \\
        --setting defaults='{}' \\
        --setting before-2-december='{"precondition": false, "rounds": 3, "support_tolerance": 0}'

``--model`` takes ``llama-7m-books`` (../shared), ``smollm2`` (the test-bed) or a model folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_fista import SHARED, resolve_model  # noqa: E402

import hf_sparse  # noqa: E402
from hf_sparse.calibration import load_calibration  # noqa: E402
from hf_sparse.cli.common import add_threads_argument, apply_threads  # noqa: E402
from hf_sparse.engine import LayerwiseEngine  # noqa: E402
from hf_sparse.masks import SparsityPattern  # noqa: E402
from hf_sparse.methods.fista import (FistaOptions, FistaPruning, Problem, cross_target, fista_prune,  # noqa: E402
                                     warm_start)


@dataclass
class OperatorProblem:
    """One linear's FISTA problem, as the engine handed it to the method."""

    weight: torch.Tensor
    hessian: torch.Tensor  # X̂X̂ᵀ
    target: torch.Tensor  # C = W·XX̂ᵀ
    dense_output_sq_norm: float  # ‖WX‖²
    sparsity: float

    def relative_error(self, pruned: torch.Tensor) -> float:
        """‖ŴX̂ − WX‖² / ‖WX‖², in float64 (a small difference of large terms)."""
        gram, target = self.hessian.double(), self.target.double()
        pruned = pruned.double()
        error = float(torch.sum(pruned * (pruned @ gram - 2.0 * target))) + self.dense_output_sq_norm
        return error / self.dense_output_sq_norm


class RecordingFista(FistaPruning):
    """FISTAPruner that also keeps a copy of every problem it solves (in the engine's order)."""

    def __init__(self, options: FistaOptions, problems: list[OperatorProblem]):
        super().__init__(options)
        self.problems = problems

    def prune_weight(self, weight, stats, pattern, sparsity):
        self.problems.append(OperatorProblem(weight.clone(), stats.hessian.clone(), cross_target(weight, stats).clone(),
                                             float(stats.dense_output_sq_norm), sparsity))
        return super().prune_weight(weight, stats, pattern, sparsity)


def collect_problems(model, calibration: torch.Tensor, config: hf_sparse.SparsityConfig,
                     blocks: list[int]) -> list[OperatorProblem]:
    """The FISTA problems of ``blocks`` (the model is pruned in place on the way, with ``config``'s options)."""
    problems: list[OperatorProblem] = []
    method = RecordingFista(FistaOptions(**config.method_options), problems)
    include = [rf"\.layers\.{block}\." for block in blocks]
    engine = LayerwiseEngine(method, config.parsed_pattern, lambda _name: config.sparsity, include=include,
                             show_progress=False)
    with torch.no_grad():
        engine.run(model, calibration, config.batch_size)
    return problems


def warm_start_mask(problem: OperatorProblem, pattern: SparsityPattern, options: FistaOptions) -> torch.Tensor:
    weight = problem.weight.float()
    solver_problem = Problem.build(problem.hessian.float(), problem.target.float(), problem.dense_output_sq_norm)
    return warm_start(weight, solver_problem, pattern, problem.sparsity, options) != 0


def geometric_mean_ratio(values: list[float], reference: list[float]) -> float:
    """exp(mean log(value / reference)): the typical per-operator ratio, which a few large operators cannot dominate."""
    return math.exp(sum(math.log(v / r) for v, r in zip(values, reference)) / len(values))


def study(problems: list[OperatorProblem], pattern: SparsityPattern, settings: dict[str, dict],
          holdout: list[OperatorProblem] | None = None) -> list[str]:
    """One markdown row per setting (see the module docstring); ``holdout`` (the same operators' problems on
    other windows) adds the held-out error and its ratio to the first setting's."""
    warm_masks = [warm_start_mask(p, pattern, FistaOptions()) for p in problems]
    rows, first_errors, first_holdout = [], None, None
    for name, options in settings.items():
        fista_options = FistaOptions(**options)
        started = time.perf_counter()
        results = [fista_prune(p.weight, p.hessian, None, p.dense_output_sq_norm, pattern, p.sparsity, fista_options,
                               target=p.target) for p in problems]
        seconds = time.perf_counter() - started
        errors = [p.relative_error(pruned) for p, (pruned, _) in zip(problems, results)]
        first_errors = first_errors or errors
        ratio = geometric_mean_ratio(errors, first_errors)
        same = [float((mask == warm).float().mean()) for (_, mask), warm in zip(results, warm_masks)]
        row = (f"| {name} | {sum(errors) / len(errors):.5f} | {ratio:.4f} | {min(same):.4f} / "
               f"{sum(same) / len(same):.4f} | {seconds:.1f} |")
        if holdout is not None:
            held = [p.relative_error(pruned) for p, (pruned, _) in zip(holdout, results)]
            first_holdout = first_holdout or held
            held_ratio = geometric_mean_ratio(held, first_holdout)
            row += f" {sum(held) / len(held):.5f} | {held_ratio:.4f} |"
        rows.append(row)
    return rows


def parse_setting(text: str) -> tuple[str, dict]:
    name, sep, raw = text.partition("=")
    try:
        options = json.loads(raw) if sep else None
    except json.JSONDecodeError:
        options = None
    if not name or not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"--setting wants NAME=JSON-OBJECT, e.g. old='{{\"rounds\": 3}}', got {text!r}")
    FistaOptions(**options)  # a bad option name or value fails here, before the model is loaded
    return name, options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a local model folder")
    parser.add_argument("--blocks", default="0", help="comma-separated decoder block indices (default 0)")
    parser.add_argument("--pattern", default="2:4", help="'unstructured' or N:M (default 2:4)")
    parser.add_argument("--sparsity", type=float, default=None, help="for --pattern unstructured (default 0.5)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-seed", type=int, default=None,
                        help="also measure every setting's error on the problems of calibration seed N")
    parser.add_argument("--setting", dest="settings", action="append", type=parse_setting, default=[],
                        metavar="NAME=JSON", help="a FISTA option set, repeatable (default: the defaults only)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    try:
        blocks = [int(block) for block in args.blocks.split(",")]
    except ValueError:
        parser.error(f"--blocks wants comma-separated integers, got {args.blocks!r}")
    apply_threads(args)
    settings = dict(args.settings) or {"defaults": {}}

    if args.holdout_seed == args.seed:
        parser.error(f"--holdout-seed {args.holdout_seed} is the calibration seed: held-out windows need another")

    model_dir = resolve_model(args.model, parser)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def problems_of_seed(seed: int) -> tuple[list[OperatorProblem], hf_sparse.SparsityConfig]:
        # A fresh model per seed: collecting prunes the studied blocks in place.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        n_blocks = model.config.num_hidden_layers
        if any(not 0 <= block < n_blocks for block in blocks):
            parser.error(f"--blocks {args.blocks}: the model has blocks 0..{n_blocks - 1}")
        calibration = load_calibration(str(SHARED / "data" / "calibration.txt"), tokenizer, args.num_samples,
                                       args.sequence_length, seed)
        config = hf_sparse.SparsityConfig(method="fista", pattern=args.pattern, sparsity=args.sparsity,
                                          calibration=calibration, num_samples=args.num_samples,
                                          sequence_length=args.sequence_length)
        return collect_problems(model, calibration, config, blocks), config

    problems, config = problems_of_seed(args.seed)
    holdout = None if args.holdout_seed is None else problems_of_seed(args.holdout_seed)[0]
    print(f"{args.model}: {len(problems)} operators of blocks {args.blocks}, {args.pattern}"
          f"{'' if config.parsed_pattern.is_n_m else f' {config.sparsity:.0%}'}, calibration {args.num_samples} x "
          f"{args.sequence_length} tokens, seed {args.seed}"
          f"{'' if holdout is None else f' (held out: seed {args.holdout_seed})'}, "
          f"{torch.get_num_threads()} thread(s)\n")
    header = ("| setting | mean relative error | ratio to the first | mask equal to the warm start's (min / mean) "
              "| solver s |")
    if holdout is not None:
        header += " held-out error | held-out ratio |"
    print(header)
    print("|---" * header.count(" | ") + "|---|")
    for row in study(problems, config.parsed_pattern, settings, holdout):
        print(row, flush=True)


if __name__ == "__main__":
    main()
