"""Prune the shared 7M LLaMA to 2:4 with Wanda, recover with sparsity-keeping LoRA, and print what it bought.

    python examples/lora_recovery.py --output recovered-2of4   # 60 steps x 4 x 256 tokens (a few minutes on 2 cores)
    python examples/lora_recovery.py --max-windows 40 --steps 20   # quick look
    python examples/lora_recovery.py --model smollm2 --method sparsegpt --max-windows 64   # the SmolLM2 test-bed

Prints dense / pruned / recovered perplexity on the WikiText-2 test split (256-token windows), sparsity before and
after recovery and whether every 2:4 group is still valid; with --output it saves the recovered checkpoint with its
model card. Assets come from $HF_SPARSE_SHARED (default: <repo>/../shared); --model is resolved as in
benchmark_pruning.py (llama-7m-books, smollm2 = the test-bed, or a local folder).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from hf_sparse.cli.common import add_threads_argument, apply_threads
from hf_sparse.evaluation import perplexity
from hf_sparse.masks import SparsityPattern, is_valid_n_m
from hf_sparse.record import overall_sparsity
from hf_sparse.recovery import recover

from benchmark_pruning import resolve_model  # examples/ is on sys.path when a script in it runs

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))


def n_m_valid(model, pattern: str) -> bool:
    parsed = SparsityPattern.parse(pattern)
    modules = dict(model.named_modules())
    return all(is_valid_n_m(modules[name].weight, parsed.n, parsed.m) for name in hf_sparse.read_record(model).modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a local folder")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--max-windows", type=int, default=100, help="test windows of 256 tokens (all: 0)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mode", default="masked", choices=hf_sparse.peft.MODES)
    parser.add_argument("--output", default=None, help="save the recovered checkpoint (+ model card) here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it is a checkpoint")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)

    model_dir, model_name = resolve_model(args.model, parser)
    calibration = SHARED / "data" / "calibration.txt"
    test_text = (SHARED / "data" / "wikitext2-test.txt").read_text(encoding="utf-8")
    max_windows = args.max_windows or None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ppl(m) -> float:
        return perplexity(m, tokenizer, test_text, sequence_length=256, max_windows=max_windows, show_progress=False)

    dense = ppl(model)
    config = hf_sparse.SparsityConfig(method=args.method, pattern=args.pattern, calibration=str(calibration),
                                      num_samples=32, sequence_length=256, seed=0)
    record = hf_sparse.prune(model, config, tokenizer=tokenizer, show_progress=False)
    pruned = ppl(model)
    sparsity_before = overall_sparsity(model, record.modules)

    result = recover(model, tokenizer, str(calibration), rank=args.rank, steps=args.steps,
                     learning_rate=args.lr, batch_size=args.batch_size, sequence_length=256, mode=args.mode)
    recovered_model = result.model
    recovered = ppl(recovered_model)
    sparsity_after = overall_sparsity(recovered_model, record.modules)
    valid = n_m_valid(recovered_model, args.pattern) if SparsityPattern.parse(args.pattern).is_n_m else "n/a"

    windows = f"first {max_windows}" if max_windows else "all"
    print(f"\n{model_name}: {args.method} {args.pattern}, LoRA r={args.rank} mode={args.mode}, {args.steps} steps x "
          f"{args.batch_size} x 256 tokens ({result.seconds:.0f} s); perplexity on {windows} 256-token windows of "
          "wikitext2-test.txt")
    print("| model | perplexity | sparsity (pruned modules) |")
    print("|---|---|---|")
    print(f"| dense | {dense:.2f} | 0 |")
    print(f"| pruned | {pruned:.2f} | {sparsity_before:.6f} |")
    print(f"| recovered | {recovered:.2f} | {sparsity_after:.6f} |")
    print(f"N:M groups valid after merge: {valid}; sparsity identical: {sparsity_before == sparsity_after}")
    if args.output:
        evaluation = {"dense_perplexity": round(dense, 2), "pruned_perplexity": round(pruned, 2),
                      "recovered_perplexity": round(recovered, 2), "eval_data": "wikitext2-test.txt",
                      "eval_sequence_length": 256}
        if max_windows:
            evaluation["eval_windows"] = max_windows
        card = hf_sparse.hub.save_with_model_card(recovered_model, tokenizer, args.output, evaluation=evaluation,
                                                  base_model=model_name, overwrite=args.overwrite)
        print(f"saved to {args.output} (model card: {card})")


if __name__ == "__main__":
    main()
