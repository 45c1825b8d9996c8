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
exit with code 2 and one line naming the problem (as argparse does for malformed options); Ctrl-C exits with 130.
``--help`` and argument errors import neither torch nor transformers: a subcommand's options are added when it is
parsed, and the package's public API is imported once the arguments are valid.

Each subcommand is one module of this package defining ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args)``; adding one is a new module plus its name in :data:`COMMANDS`. Options every command has
(``--threads``, ``--quiet``) are added here, and every option's help shows its default. A command module imports
only argparse-level code at its top; what ``run`` needs (torch, transformers, the library) it imports inside.
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


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default: appended unless the text already gives one, or there is none to give
    (``None``, a flag that is off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default in (None, False, [], argparse.SUPPRESS)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its options only when it is used (parsing, help), so that ``hf-sparse --help``
    and the parsing of one subcommand import no other subcommand's dependencies."""

    def __init__(self, *args, command_module=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._command_module = command_module

    def populate(self) -> "_CommandParser":
        module, self._command_module = self._command_module, None
        if module is not None:
            module.add_arguments(self)
            common = self.add_argument_group("common options")
            add_threads_argument(common)
            common.add_argument("-q", "--quiet", action="store_true",
                                help="no progress bars and only errors in the log (-v on the main command explains "
                                     "more)")
            self.set_defaults(func=module.run)
        return self

    def parse_known_args(self, *args, **kwargs):
        self.populate()
        return super().parse_known_args(*args, **kwargs)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The ``hf-sparse`` argument parser with every subcommand of :data:`COMMANDS`.

    With ``lazy`` a subcommand's options are added only when that subcommand is parsed or its help shown (what
    :func:`main` uses); otherwise every subparser is complete (for documentation generators and tests).

    >>> sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(COMMANDS)
    True
    """
    from .. import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Post-training pruning of Hugging Face causal LMs.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=_CommandParser)
    for name in COMMANDS:
        command = importlib.import_module(f".{name}", __name__)
        sub = subparsers.add_parser(name, help=command.HELP, description=command.DESCRIPTION,
                                    formatter_class=_HelpFormatter, command_module=command)
        if not lazy:
            sub.populate()
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


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The first line of an error's text, cut to ``limit`` characters (a value echoed whole can be megabytes)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else f"{line[:limit - 1]}… ({len(line)} characters)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-sparse``; returns the exit code (0, or 2 for bad input or an OS error).

    >>> main(["methods", "--threads", "1"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(lazy=True).parse_args(argv)
    try:
        # Only now, with valid arguments, the package's public API and its transformers hooks (see hf_sparse.load).
        from .. import load

        load()
        _configure_logging(args.verbose, getattr(args, "quiet", False))
        apply_threads(args)
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left behind
        print(f"{PROG} {args.command}: interrupted; an output folder is written whole or not at all (a sweep keeps "
              "the points it finished)", file=sys.stderr)
        return 130
    except (ValueError, ImportError) as error:  # bad input; an optional extra that is not installed (lm-eval, ...)
        return _fail(args.command, _one_line(error))
    except OSError as error:  # a full disk, a read-only folder, a permission: not a bug, so no traceback
        return _fail(args.command, f"{type(error).__name__}: {_one_line(error)}")
    except Exception as error:  # noqa: BLE001 - only safetensors' errors, which report I/O (a full disk) and bad files
        if not type(error).__module__.startswith("safetensors"):
            raise
        return _fail(args.command, f"{type(error).__name__}: {_one_line(error)}")
    return 0


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    logger.debug("traceback of the error above", exc_info=True)
    return 2


__all__ = ["COMMANDS", "build_parser", "main"]
