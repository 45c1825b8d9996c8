"""``hf-sparse eval MODEL_OR_DIR --data test.txt --sequence-length 256``"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (add_model_arguments, default_eval_length, load_model_and_tokenizer, positive_int, print_table,
                     read_eval_texts)

HELP = "perplexity of a model on held-out text"
DESCRIPTION = ("Print the perplexity of MODEL_OR_DIR on --data (non-overlapping windows unless --stride is smaller "
               "than --sequence-length).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_DIR", help="local folder or Hub id")
    parser.add_argument("--data", required=True, metavar="PATH", help="held-out text file or folder")
    parser.add_argument("--sequence-length", type=positive_int, default=None,
                        help="window length (default 2048, or the model's context if shorter)")
    parser.add_argument("--stride", type=positive_int, default=None, help="window step (default: sequence length)")
    parser.add_argument("--max-windows", type=positive_int, default=None, help="evaluate on at most N windows")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse eval``; returns the perplexity and settings it printed."""
    from ..evaluation import perplexity
    from ..record import read_record

    texts = read_eval_texts(args.data)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    length = default_eval_length(model, args.sequence_length)
    if args.stride is not None and args.stride > length:
        raise ValueError(f"--stride {args.stride} is larger than the sequence length {length}; allowed: 1..{length}")
    ppl = perplexity(model, tokenizer, texts, sequence_length=length, stride=args.stride,
                     batch_size=args.batch_size, max_windows=args.max_windows)
    record = read_record(model)
    rows = [("model", str(args.model) + (f" ({args.gguf_file})" if args.gguf_file else "")), ("data", str(args.data)),
            ("windows", f"{length} tokens, stride {args.stride or length}"
                        + (f", at most {args.max_windows}" if args.max_windows else "")),
            ("sparsity", f"{record.overall_sparsity:.4f} ({record.method}, {record.pattern})" if record else "dense"),
            ("perplexity", f"{ppl:.2f}")]
    print_table(rows)
    return {"perplexity": ppl, "sequence_length": length}
