"""``hf-sparse recover MODEL_DIR --data train.txt --output recovered/``: sparsity-keeping LoRA, merged."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (add_model_arguments, add_output_arguments, check_output, evaluation_entry,
                     load_model_and_tokenizer, positive_int, read_eval_texts, save_output)

HELP = "LoRA recovery that keeps the sparsity, merged into a new checkpoint"
DESCRIPTION = ("Train sparsity-keeping LoRA adapters on text, merge them, and save a checkpoint that is exactly as "
               "sparse as MODEL_DIR (same zeros, same N:M groups), with a model card.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..integrations.peft import MODES
    from ..recovery import RecoveryConfig

    defaults = RecoveryConfig()
    parser.add_argument("model", metavar="MODEL_DIR", help="a pruned checkpoint (local folder or Hub id)")
    parser.add_argument("--data", required=True, help="training text: .txt/.json/.jsonl file, folder or dataset name")
    parser.add_argument("--mode", choices=MODES, default=defaults.mode,
                        help="masked: mask in the training forward too (default); merge: mask at merge only")
    parser.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument("--sequence-length", type=positive_int, default=defaults.sequence_length,
                        help="tokens per sequence")
    parser.add_argument("--target-modules", default=defaults.target_modules,
                        help="peft target_modules: 'all-linear' or a comma-separated list of names")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for windows and adapter init")
    parser.add_argument("--eval-data", default=None, help="held-out text: print and record perplexity before/after")
    parser.add_argument("--eval-sequence-length", type=positive_int, default=256, help="perplexity window length")
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="evaluate on at most this many windows")
    add_model_arguments(parser, dtypes=("float32", "bfloat16", "float16"))
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse recover``; returns the numbers it printed (for tests and scripts)."""
    from ..evaluation import perplexity
    from ..record import read_record
    from ..recovery import recover

    check_output(args)
    texts = read_eval_texts(args.eval_data) if args.eval_data else None
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    target = args.target_modules if args.target_modules == "all-linear" else \
        [name.strip() for name in args.target_modules.split(",") if name.strip()]

    def measure(m) -> float:
        return perplexity(m, tokenizer, texts, sequence_length=args.eval_sequence_length, max_windows=args.max_windows)

    pruned_ppl = measure(model) if texts is not None else None
    result = recover(model, tokenizer, args.data, rank=args.rank, alpha=args.alpha, steps=args.steps,
                     learning_rate=args.lr, batch_size=args.batch_size, sequence_length=args.sequence_length,
                     mode=args.mode, target_modules=target, seed=args.seed)
    evaluation = None
    if texts is not None:
        evaluation = evaluation_entry({"pruned": pruned_ppl, "recovered": measure(result.model)}, args.eval_data,
                                      args.eval_sequence_length, args.max_windows)
    save_output(result.model, tokenizer, args, evaluation)
    record = read_record(result.model)
    summary = {"overall_sparsity": record.overall_sparsity, "final_loss": result.losses[-1], **(evaluation or {})}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
