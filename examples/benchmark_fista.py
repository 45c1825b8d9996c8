"""Benchmark FISTAPruner against magnitude, Wanda and SparseGPT on a pretrained model.

Prints a markdown table of WikiText-2 test perplexity for 50% unstructured, 2:4 and 70% unstructured pruning, and the
seconds per decoder block that FISTA and SparseGPT spend pruning on this machine (CPU), measured in the same run
(the methods alternate per setting, so load drift hits both).

    python examples/benchmark_fista.py                      # full evaluation: every 256-token window (1458)
    python examples/benchmark_fista.py --max-windows 100    # quicker
    HF_SPARSE_SHARED=/path/to/shared python examples/benchmark_fista.py
    # SmolLM2-135M test-bed (examples/make_testbed.py), SparseGPT vs FISTA at 2:4 only, first 64 windows
    python examples/benchmark_fista.py --model smollm2 --max-windows 64 --rows SparseGPT,FISTA --settings 2:4

``--model`` is ``llama-7m-books`` (default, from ``../shared``), ``smollm2`` (the test-bed) or a local folder.
``--rows`` picks table rows by name, ``--settings`` columns by label; ``--method-option KEY=VALUE`` adds an option
to every FISTA row (e.g. to measure a non-default setting against the defaults' table).

Calibration: 32 windows of 256 tokens drawn with seed 0 from calibration.txt (the WikiText-2 validation split), the
same token ids for every method.
"""

from __future__ import annotations

import argparse
import copy
import json
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


def resolve_model(name: str, parser: argparse.ArgumentParser) -> Path:
    """The model folder for ``--model``: the shared 7M LLaMA, the SmolLM2 test-bed, or a local folder."""
    if name == "smollm2":
        from hf_sparse import testbed

        try:
            return testbed.ensure_testbed()
        except testbed.TestbedUnavailable as error:
            parser.error(str(error))
    folder = SHARED / "models" / name if name == "llama-7m-books" else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        parser.error(f"--model {name!r}: no model folder at {folder} (for llama-7m-books set HF_SPARSE_SHARED)")
    return folder


def _pick(parser: argparse.ArgumentParser, flag: str, value: str | None, items: list, key) -> list:
    if value is None:
        return items
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    names = [key(item) for item in items]
    unknown = [name for name in wanted if name not in names]
    if unknown or not wanted:
        parser.error(f"{flag} {unknown or '(empty)'}: choose from {names}")
    return [item for item in items if key(item) in wanted]


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--method-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a local model folder")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows only")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", help=f"comma-separated rows to run (default all: {', '.join(m[0] for m in METHODS)})")
    parser.add_argument("--settings", help="comma-separated columns to run (default all: 50%%, 2:4, 70%%)")
    parser.add_argument("--method-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="extra FISTA option for every FISTA row (repeatable; the value is read as JSON)")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args)
    methods = _pick(parser, "--rows", args.rows, METHODS, lambda item: item[0])
    settings = _pick(parser, "--settings", args.settings, SETTINGS, lambda item: item[0])
    extra = dict(args.method_option)

    model_dir = resolve_model(args.model, parser)
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
    rows = {"dense": {label: dense_ppl for label, _, _ in settings}}
    seconds: dict[str, dict[str, float]] = {}
    # Settings outermost: SparseGPT and FISTA of one setting run back to back, so their time ratio is side by side.
    for label, pattern, sparsity in settings:
        for name, method, options in methods:
            rows.setdefault(name, {})
            model = copy.deepcopy(dense)
            if method == "fista":
                options = {**options, **extra}
            config = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=sparsity,
                                              calibration=calibration, num_samples=args.num_samples,
                                              sequence_length=args.sequence_length, method_options=options)
            start = time.perf_counter()
            hf_sparse.prune(model, config, show_progress=False)
            elapsed = time.perf_counter() - start
            if name in ("FISTA", "SparseGPT"):
                seconds.setdefault(name, {})[label] = elapsed / n_blocks
            rows[name][label] = evaluate(model)
            print(f"  {name:28s} {label:4s} ppl {rows[name][label]:8.2f}  ({elapsed:.1f} s)", flush=True)

    windows = "all windows" if args.max_windows is None else f"first {args.max_windows} windows"
    print(f"\n{args.model}: WikiText-2 test perplexity (256-token windows, {windows}); calibration "
          f"{args.num_samples} x {args.sequence_length} tokens, seed {args.seed}"
          + (f"; FISTA options {extra}" if extra else "") + "\n")
    print("| method | " + " | ".join(label for label, _, _ in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[label]:.2f}" for label, _, _ in settings) + " |")
    print(f"\nPruning time per decoder block, CPU ({torch.get_num_threads()} threads), seconds\n")
    print("| method | " + " | ".join(label for label, _, _ in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for name, values in seconds.items():
        print(f"| {name} | " + " | ".join(f"{values[label]:.2f}" for label, _, _ in settings) + " |")
    if {"FISTA", "SparseGPT"} <= seconds.keys():
        ratios = [seconds["FISTA"][label] / seconds["SparseGPT"][label] for label, _, _ in settings]
        print("| FISTA / SparseGPT | " + " | ".join(f"{ratio:.2f}×" for ratio in ratios) + " |")


if __name__ == "__main__":
    main()
