"""The ``hf-sparse`` command: prune a model, measure perplexity, list methods, recover with LoRA.

    hf-sparse prune MODEL --method wanda --pattern 2:4 --calibration calibration.txt --output pruned/ \\
        --eval-data wikitext2-test.txt --eval-sequence-length 256
    hf-sparse eval pruned/ --data wikitext2-test.txt --sequence-length 256
    hf-sparse methods
    hf-sparse recover pruned/ --data train.txt --output recovered/
    hf-sparse eval pruned/ --tasks arc_easy,piqa --limit 500
    hf-sparse sweep MODEL --methods wanda,sparsegpt --sparsities 0.5,0.7 --calibration calib.txt --eval-data test.txt --output sweep/
    hf-sparse bench pruned/ --baseline MODEL --prompt-length 512 --new-tokens 64
    hf-sparse compress pruned/ pruned-compact/        (and `hf-sparse decompress IN OUT` for a dense export)
    hf-sparse export pruned/ pruned.gguf --outtype f16  (for llama.cpp)

Tables go to stdout, progress bars and logs to stderr. Bad input, and an operating-system error such as a full disk,
exit with code 2 and one line naming the problem (as argparse does for malformed options).

Each subcommand is one module of this package defining ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args)``; adding one is a new module plus its name in :data:`COMMANDS`. Options every command has
(``--threads``) are added here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .common import PROG, add_threads_argument, apply_threads

logger = logging.getLogger("hf_sparse.cli")

#: the subcommands, in the order ``hf-sparse --help`` lists them (module names in this package)
COMMANDS = ("prune", "eval", "sweep", "bench", "methods", "recover", "compress", "decompress", "export")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-sparse`` argument parser with every subcommand of :data:`COMMANDS`."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Post-training pruning of Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        command = importlib.import_module(f".{name}", __name__)
        sub = subparsers.add_parser(name, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(sub)
        common = sub.add_argument_group("common options")
        add_threads_argument(common)
        common.add_argument("-q", "--quiet", action="store_true",
                            help="no progress bars and only errors in the log (-v on the main command explains more)")
        sub.set_defaults(func=command.run)
    return parser


def _configure_logging(verbosity: int, quiet: bool = False) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if quiet:
        level = logging.ERROR
        # Our bars take show_progress=not args.quiet; this silences transformers' own (model loading).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hf_sparse").setLevel(level)
    if verbosity >= 2:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-sparse``; returns the exit code (0, or 2 for bad input or an OS error).

    >>> main(["methods", "--threads", "1"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, getattr(args, "quiet", False))
    try:
        apply_threads(args)
        args.func(args)
    except ValueError as error:
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        logger.debug("traceback of the error above", exc_info=True)
        return 2
    except ImportError as error:  # an optional extra that is not installed (lm-eval, matplotlib)
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        logger.debug("traceback of the error above", exc_info=True)
        return 2
    except OSError as error:  # a full disk, a read-only folder, a permission: not a bug, so no traceback
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        logger.debug("traceback of the error above", exc_info=True)
        return 2
    return 0


__all__ = ["COMMANDS", "build_parser", "main"]
