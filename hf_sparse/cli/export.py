"""``hf-sparse export IN OUT.gguf``: a checkpoint as one GGUF file for llama.cpp (:func:`hf_sparse.export_gguf`)."""

from __future__ import annotations

import argparse

from .common import format_bytes, print_table

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # hf_sparse.export.gguf.OUTTYPES, listed here so --help imports no torch
HELP = "write a checkpoint as a GGUF file for llama.cpp (llama, qwen2 or per-layer deci)"
DESCRIPTION = ("Export a dense, pruned or structurally pruned Llama-family checkpoint to GGUF: one block shape keeps "
               "the family's architecture, per-block widths become llama.cpp's 'deci' with per-layer arrays. The "
               "tokenizer, chat template and sparsity record go into the file; OUT appears only once complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint folder (with its tokenizer)")
    parser.add_argument("output", metavar="OUT.gguf", help="GGUF file to write (must not exist)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32",
                        help="type of the matrices (norms and biases stay f32; default f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> None:
    from ..export.gguf import export_gguf  # torch and gguf load only when exporting

    path = export_gguf(args.input, args.output, outtype=args.outtype, overwrite=args.overwrite,
                       show_progress=not getattr(args, "quiet", False))
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    print_table([
        ("architecture", arch),
        ("layers", str(reader.fields[f"{arch}.block_count"].contents())),
        ("outtype", args.outtype),
        ("file", f"{path} ({format_bytes(path.stat().st_size)})"),
    ])
