"""Prune -> distil -> evaluate in one script: the shared 7M LLaMA (or the SmolLM2 test-bed) pruned, then recovered by
distillation from its own dense model with sparsity-keeping LoRA, beside the dense model given the same training.

    python examples/lora_recovery.py                                      # Wanda 2:4, 60 steps x 4 x 256 tokens
    python examples/lora_recovery.py --method flap --pattern 30% --objective distill --steps 100
    python examples/lora_recovery.py --model smollm2 --method sparsegpt --max-windows 64 --threads 1
    python examples/lora_recovery.py --model smollm2 --method flap --pattern 30% --teacher-correction 60
    python examples/lora_recovery.py --objective lm --no-control --output recovered-2of4

Prints dense / dense + same training / pruned / recovered perplexity on the WikiText-2 test split (256-token windows;
training text: calibration.txt, the validation split), whether every mask is unchanged (or every shape, for a
structured pattern such as ``30%`` with a structured method); with --output saves the recovered checkpoint with its
model card. Assets come from $HF_SPARSE_SHARED (default: <repo>/../shared); --model as in benchmark_pruning.py.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from hf_sparse.cli.common import add_threads_argument, apply_threads
from hf_sparse.evaluation import perplexity
from hf_sparse.methods import get_method_class
from hf_sparse.recovery import OBJECTIVES, RecoveryConfig, recover

from benchmark_pruning import resolve_model  # examples/ is on sys.path when a script in it runs

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))


def pruning_config(method: str, pattern: str, calibration: str) -> hf_sparse.SparsityConfig:
    """``30%`` with a structured method (flap, shortgpt, sleb, disp_llm, ...) removes that share of the block
    parameters; ``2:4`` or ``50%`` with a masking method (wanda, sparsegpt, ...) zeroes weights."""
    options = dict(method=method, calibration=calibration, num_samples=32, sequence_length=256, seed=0)
    if pattern.endswith("%"):
        share = float(pattern[:-1]) / 100
        structured = "structured" in get_method_class(method).supports_patterns
        return hf_sparse.SparsityConfig(**options, pattern="structured" if structured else "unstructured",
                                        sparsity=share)
    return hf_sparse.SparsityConfig(**options, pattern=pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a local folder")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="2:4", help="N:M, or a percentage (structured for structured methods)")
    parser.add_argument("--objective", default=RecoveryConfig.objective, choices=OBJECTIVES)
    parser.add_argument("--train", default="lora", choices=("lora", "full"))
    parser.add_argument("--max-windows", type=int, default=100, help="test windows of 256 tokens (all: 0)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for LoRA, 1e-4 for full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--teacher-correction", type=int, default=0, metavar="STEPS",
                        help="train the teacher STEPS steps on the training text before distilling (Minitron's "
                             "teacher correction; default 0 = off)")
    parser.add_argument("--no-control", action="store_true", help="skip training the dense model the same way")
    parser.add_argument("--output", default=None, help="save the recovered checkpoint (+ model card) here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it is a checkpoint")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)

    model_dir, model_name = resolve_model(args.model, parser)
    calibration = str(SHARED / "data" / "calibration.txt")
    test_text = (SHARED / "data" / "wikitext2-test.txt").read_text(encoding="utf-8")
    max_windows = args.max_windows or None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ppl(m) -> float:
        return perplexity(m, tokenizer, test_text, sequence_length=256, max_windows=max_windows, show_progress=False)

    training = dict(steps=args.steps, batch_size=args.batch_size, sequence_length=256, rank=args.rank,
                    learning_rate=args.lr, method=args.train, show_progress=True)
    dense = ppl(dense_model)
    control = None
    if not args.no_control:
        control = ppl(recover(copy.deepcopy(dense_model), tokenizer, calibration, objective="lm", dense_control=True,
                              **training).model)

    model = copy.deepcopy(dense_model)
    model.name_or_path = str(model_dir)  # the record names the dense folder as the base model
    hf_sparse.prune(model, pruning_config(args.method, args.pattern, calibration), tokenizer=tokenizer,
                    show_progress=False)
    pruned = ppl(model)
    masks = hf_sparse.get_masks(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    result = recover(model, tokenizer, calibration, objective=args.objective,
                     teacher_model=dense_model if args.objective != "lm" else None,
                     teacher_correction_steps=args.teacher_correction if args.objective != "lm" else 0, **training)
    recovered = ppl(result.model)
    after = hf_sparse.get_masks(result.model)
    same_masks = all(torch.equal(after[name], mask) for name, mask in masks.items())
    same_shapes = {k: tuple(v.shape) for k, v in result.model.state_dict().items()} == shapes

    windows = f"first {max_windows}" if max_windows else "all"
    print(f"\n{model_name}: {args.method} {args.pattern}, recovery {args.objective} with {args.train} "
          f"({args.steps} steps x {args.batch_size} x 256 tokens, {result.seconds:.0f} s); perplexity on {windows} "
          "256-token windows of wikitext2-test.txt")
    print("| model | perplexity |")
    print("|---|---|")
    print(f"| dense | {dense:.2f} |")
    if control is not None:
        print(f"| dense + same training (LM loss) | {control:.2f} |")
    print(f"| pruned | {pruned:.2f} |")
    corrected = f", teacher corrected for {args.teacher_correction} steps" if args.teacher_correction else ""
    print(f"| pruned + {args.objective}{corrected} | {recovered:.2f} |")
    if pruned > dense:
        print(f"gap to the dense model closed: {(pruned - recovered) / (pruned - dense):.0%}")
    print(f"masks unchanged: {same_masks}; shapes unchanged: {same_shapes}")
    if args.output:
        evaluation = {"dense_perplexity": round(dense, 2), "pruned_perplexity": round(pruned, 2),
                      "recovered_perplexity": round(recovered, 2), "eval_data": "wikitext2-test.txt",
                      "eval_sequence_length": 256, **({"eval_windows": max_windows} if max_windows else {})}
        card = hf_sparse.hub.save_with_model_card(result.model, tokenizer, args.output, evaluation=evaluation,
                                                  base_model=model_name, overwrite=args.overwrite)
        print(f"saved to {args.output} (model card: {card})")


if __name__ == "__main__":
    main()
