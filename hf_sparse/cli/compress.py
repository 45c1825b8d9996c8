"""``hf-sparse compress IN OUT``: a pruned checkpoint in compact storage (N:M values + positions, or bitmask + values).

``hf-sparse decompress`` (:mod:`hf_sparse.cli.decompress`) is the inverse; both print the same size table.
"""

from __future__ import annotations

import argparse

from .common import format_bytes, print_table

HELP = "rewrite a pruned checkpoint with its pruned linears in compact storage"
DESCRIPTION = ("Store each pruned linear of a checkpoint in its smallest form: N:M values + 2-bit positions (2:4: "
               "0.5625x fp16), bitmask + values (0.5625x at 50%, 0.3625x at 70%), or dense. The output loads with "
               "`import hf_sparse` and from_pretrained, bit-identical; OUT appears only once complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint folder (safetensors)")
    parser.add_argument("output", metavar="OUT", help="folder to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint")


def print_sizes(summary, files_bytes: tuple[int, int]) -> None:
    """The size table of ``compress``/``decompress``: tensor bytes and file bytes, input against output."""
    before, after = files_bytes
    print_table([
        ("tensors (dense)", format_bytes(summary.dense_bytes)),
        ("tensors (stored)", f"{format_bytes(summary.stored_bytes)} "
                             f"({summary.stored_bytes / max(summary.dense_bytes, 1):.4f}x dense)"),
        ("files in -> out", f"{format_bytes(before)} -> {format_bytes(after)}"),
        ("encodings", ", ".join(f"{k}: {v}" for k, v in sorted(summary.record_entry()["encodings"].items())) or "-"),
    ])


def check_folders(args: argparse.Namespace) -> None:
    """OUT is refused in the command's words before IN is read: the input itself, inside or around it, empty, or an
    existing folder without --overwrite."""
    from ..saving import check_destination, check_not_the_input

    check_not_the_input(args.output, args.input, label="OUT", source_label="the input IN")
    check_destination(args.output, args.overwrite, label="OUT", overwrite_hint="pass --overwrite")


def run(args: argparse.Namespace) -> None:
    from ..formats import checkpoint_bytes, compress_checkpoint

    check_folders(args)
    summary = compress_checkpoint(args.input, args.output, overwrite=args.overwrite, show_progress=not args.quiet)
    print_sizes(summary, (checkpoint_bytes(args.input), checkpoint_bytes(args.output)))
