"""Benchmark FISTAPruner against magnitude, Wanda and SparseGPT on the shared pretrained model.

Prints a markdown table of WikiText-2 test perplexity for 50% unstructured, 2:4 and 70% unstructured pruning, and the
seconds per decoder block that FISTA and SparseGPT spend pruning on this machine (CPU).

    python examples/benchmark_fista.py                      # full evaluation: every 256-token window (1458)
    python examples/benchmark_fista.py --max-windows 100    # quicker
    HF_SPARSE_SHARED=/path/to/shared python examples/benchmark_fista.py

Calibration: 32 windows of 256 tokens drawn with seed 0 from calibration.txt (the WikiText-2 validation split), the
same token ids for every method.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from hf_sparse.calibration import load_calibration
from hf_sparse.cli.common import add_threads_argument, apply_threads

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
SETTINGS = [("50%", "unstructured", 0.5), ("2:4", "2:4", None), ("70%", "unstructured", 0.7)]
METHODS = [
    ("magnitude", "magnitude", {}),
    ("Wanda", "wanda", {}),
    ("SparseGPT", "sparsegpt", {}),
    ("FISTA", "fista", {}),
    ("FISTA, no error correction", "fista", {"error_correction": False}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows only")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)

    model_dir = SHARED / "models" / "llama-7m-books"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    test_text = (SHARED / "data" / "wikitext2-test.txt").read_text(encoding="utf-8")
    calibration = load_calibration(str(SHARED / "data" / "calibration.txt"), tokenizer, args.num_samples,
                                   args.sequence_length, args.seed)
    n_blocks = dense.config.num_hidden_layers

    def evaluate(model) -> float:
        return hf_sparse.evaluate.perplexity(model, tokenizer, test_text, sequence_length=256, batch_size=16,
                                             max_windows=args.max_windows, show_progress=False)

    dense_ppl = evaluate(dense)
    rows = {"dense": {label: dense_ppl for label, _, _ in SETTINGS}}
    seconds: dict[str, dict[str, float]] = {}
    for name, method, options in METHODS:
        rows[name] = {}
        for label, pattern, sparsity in SETTINGS:
            model = copy.deepcopy(dense)
            config = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=sparsity,
                                              calibration=calibration, num_samples=args.num_samples,
                                              sequence_length=args.sequence_length, method_options=options)
            start = time.perf_counter()
            hf_sparse.prune(model, config, show_progress=False)
            elapsed = time.perf_counter() - start
            if method in ("fista", "sparsegpt") and not options:
                seconds.setdefault(name, {})[label] = elapsed / n_blocks
            rows[name][label] = evaluate(model)
            print(f"  {name:28s} {label:4s} ppl {rows[name][label]:8.2f}  ({elapsed:.1f} s)", flush=True)

    windows = "all windows" if args.max_windows is None else f"first {args.max_windows} windows"
    print(f"\nWikiText-2 test perplexity (256-token windows, {windows}); calibration {args.num_samples} x "
          f"{args.sequence_length} tokens, seed {args.seed}\n")
    print("| method | " + " | ".join(label for label, _, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[label]:.2f}" for label, _, _ in SETTINGS) + " |")
    print(f"\nPruning time per decoder block, CPU ({torch.get_num_threads()} threads), seconds\n")
    print("| method | " + " | ".join(label for label, _, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for name, values in seconds.items():
        print(f"| {name} | " + " | ".join(f"{values[label]:.2f}" for label, _, _ in SETTINGS) + " |")
    if {"FISTA", "SparseGPT"} <= seconds.keys():
        ratios = [seconds["FISTA"][label] / seconds["SparseGPT"][label] for label, _, _ in SETTINGS]
        print("| FISTA / SparseGPT | " + " | ".join(f"{ratio:.2f}×" for ratio in ratios) + " |")


if __name__ == "__main__":
    main()
