"""``hf-sparse decompress IN OUT``: a compact checkpoint back to plain dense safetensors (for serving engines)."""

from __future__ import annotations

import argparse

from .compress import add_arguments as _shared_arguments
from .compress import check_folders, print_sizes

HELP = "rewrite a compact checkpoint as a plain dense one (loads anywhere)"
DESCRIPTION = ("Decode every compact weight of IN back to its dense tensor (bit-identical) and write a plain "
               "checkpoint that plain transformers and serving engines load; OUT appears only once complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from ..formats import checkpoint_bytes, decompress_checkpoint

    check_folders(args)
    summary = decompress_checkpoint(args.input, args.output, overwrite=args.overwrite,
                                    show_progress=not args.quiet)
    print_sizes(summary, (checkpoint_bytes(args.input), checkpoint_bytes(args.output)))
