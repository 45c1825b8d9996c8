"""How good DISP-LLM's importance start is before any training, by where it puts its cuts.

DISP-LLM's default start (``init="importance"``) thresholds Wanda-like importance scores of the five selections of
every block at the target share, after raising the four residual selections' standardised scores by a shift (2 by
default): cutting the residual stream costs more than cutting MLP channels of the same rank. This script computes the
scores once (one dense calibration pass), then for every ``--sparsities`` x ``--shifts`` builds the start's masks
alone (no hypernetwork, no training), prunes a copy of the model with and without bias compensation and prints the
perplexity and the share of each selection kept ("removed" is the masks' share; the compensation biases add a
few parameters back, about 0.1% of a block). It is the table "the start alone, by residual shift" of the
README's DISP-LLM section.

    python examples/disp_start_study.py --model smollm2 --sparsities 0.2 --shifts 0,1,2,100 --eval-windows 32

``--model`` takes ``llama-7m-books`` (../shared), ``smollm2`` (the test-bed) or a model folder.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_fista import SHARED, resolve_model  # noqa: E402

from hf_sparse.calibration import load_calibration  # noqa: E402
from hf_sparse.cli.common import add_threads_argument, apply_threads  # noqa: E402
from hf_sparse.engine.structured import StructuredSession  # noqa: E402
from hf_sparse.evaluation.perplexity import perplexity  # noqa: E402
from hf_sparse.methods.disp_llm import (SELECTIONS, block_costs, compensation_biases, dense_moments,  # noqa: E402
                                        edits_from_masks, importance_prior, importance_scores, kept_parameters)
from hf_sparse.surgery import apply_edits  # noqa: E402


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a local model folder")
    parser.add_argument("--sparsities", type=floats, default=[0.2], help="shares of block parameters, e.g. 0.2,0.5")
    parser.add_argument("--shifts", type=floats, default=[0.0, 1.0, 2.0],
                        help="residual shifts in standard deviations (a large one, e.g. 100: MLP channels only)")
    parser.add_argument("--eval-windows", type=int, default=32, help="256-token test windows (default 32)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    bad = [s for s in args.sparsities if not 0.0 < s < 1.0]
    if bad:
        parser.error(f"--sparsities must lie in (0, 1), got {bad}")
    apply_threads(args)

    model_dir = resolve_model(args.model, parser)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    calibration = load_calibration(str(SHARED / "data" / "calibration.txt"), tokenizer, args.num_samples,
                                   args.sequence_length, seed=args.seed)
    test = (SHARED / "data" / "wikitext2-test.txt").read_text()

    def evaluate(m) -> float:
        return perplexity(m, tokenizer, test, sequence_length=256, max_windows=args.eval_windows, show_progress=False)

    session = StructuredSession(model, calibration, show_progress=False)
    costs = [block_costs(session, index) for index in range(session.num_blocks)]
    total = session.block_parameters
    moments = dense_moments(session)
    scores = importance_scores(session, moments)
    print(f"dense perplexity {evaluate(model):.2f} ({args.eval_windows} windows of 256)")
    print("| sparsity | residual shift | removed | kept: " + " / ".join(SELECTIONS)
          + " | perplexity | with compensation |")
    print("|---|---|---|---|---|---|")
    for sparsity in args.sparsities:
        for shift in args.shifts:
            prior = importance_prior(scores, costs, (1 - sparsity) * total, None, residual_shift=shift)
            masks = [(p > 0).float() for p in prior]
            shares = [sum(float(masks[i].sum()) for i in range(k, len(masks), 5))
                      / sum(masks[i].numel() for i in range(k, len(masks), 5)) for k in range(len(SELECTIONS))]
            results = []
            for compensate in (False, True):
                edits = edits_from_masks(masks, costs)
                if compensate:
                    for index, edit in edits.blocks.items():
                        edit.new_biases.update(compensation_biases(session, index, moments[index],
                                                                   masks[5 * index: 5 * index + 5]))
                pruned = copy.deepcopy(model)
                apply_edits(pruned, session.adapter, edits)
                results.append(evaluate(pruned))
                del pruned
            removed = 1 - float(kept_parameters(costs, masks)) / total
            print(f"| {sparsity:g} | {shift:g} | {removed:.4f} | " + " / ".join(f"{x:.2f}" for x in shares)
                  + f" | {results[0]:.2f} | {results[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
