"""The ``hf-sparse`` command: prune a model, measure perplexity, list methods, recover with LoRA.

    hf-sparse prune MODEL --method wanda --pattern 2:4 --calibration calibration.txt --output pruned/ \\
        --eval-data wikitext2-test.txt --eval-sequence-length 256
    hf-sparse eval pruned/ --data wikitext2-test.txt --sequence-length 256
    hf-sparse methods
    hf-sparse recover pruned/ --data train.txt --output recovered/

Tables go to stdout, progress bars and logs to stderr. Bad input exits with code 2 and one line naming the bad value
and what is allowed (as argparse does for malformed options).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_sparse.cli")

DTYPES = ("float32", "float16", "bfloat16", "auto")
PROG = "hf-sparse"


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def parse_method_option(text: str) -> tuple[str, Any]:
    """``"block_size=64"`` -> ``("block_size", 64)``; the value is JSON when it parses, else the raw string.

    >>> parse_method_option("dampening=0.02"), parse_method_option("init=wanda"), parse_method_option("per_row=true")
    (('dampening', 0.02), ('init', 'wanda'), ('per_row', True))
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--method-option {text!r} must look like key=value, e.g. block_size=64")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes on the command line
    return key, value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; a positive integer is required") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; a positive integer is required")
    return value


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage`` reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path (a dataset name never starts with . / ~ or ends in .txt)."""
    from .calibration import JSON_SUFFIXES, TEXT_SUFFIXES

    return source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)


def _read_eval_texts(path: str) -> list[str]:
    """Held-out text from a local file or folder (never a download: evaluation data is named explicitly)."""
    from .calibration import read_texts

    if not Path(path).expanduser().exists():
        raise ValueError(f"evaluation data {path!r} does not exist; give a local .txt/.json/.jsonl file or folder")
    return read_texts(str(Path(path).expanduser()))


def load_model_and_tokenizer(name_or_path: str, dtype: str):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder or Hub id, errors as ``ValueError``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:  # transformers reports a missing folder / unknown Hub id / no network as OSError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load model {name_or_path!r} (a local folder or Hub id is allowed): "
                         f"{first_line}") from error
    return model, tokenizer


def default_eval_length(model, requested: int | None) -> int:
    """``requested``, or 2048 capped at the model's context (a default, never a silent change of the user's value)."""
    if requested is not None:
        return requested
    context = getattr(model.config, "max_position_embeddings", None)
    return min(2048, context) if context else 2048


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; on success it is renamed to ``output``.

    On any exception the temporary folder is removed and ``output`` is untouched, so a crash never leaves a
    half-written checkpoint behind. With ``overwrite`` an existing ``output`` is replaced only after the new one
    is complete.

    >>> with atomic_output_dir("pruned") as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    output = Path(output).expanduser().absolute()
    if output.exists() and not overwrite:
        raise ValueError(f"output {str(output)!r} already exists; choose a new folder or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, not /tmp: the final rename must stay on one file system to be atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            backup.rmdir()
            output.rename(backup)
            tmp.rename(output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def print_table(rows: Sequence[tuple[str, str]], file=None) -> None:
    """A two-column plain-text table on stdout."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}", file=file or sys.stdout)


# ---------------------------------------------------------------------------------------------------------------
# prune


def add_prune_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune", help="prune a model and save it (with perplexity before/after, if --eval-data is given)",
        description="Load MODEL (local folder or Hub id), prune it with hf_sparse.prune, measure perplexity before "
                    "and after on --eval-data, and save model + tokenizer (+ model card) to --output. The output "
                    "folder appears only once it is complete.",
    )
    parser.add_argument("model", metavar="MODEL", help="local folder or Hub id of a causal LM")
    what = parser.add_argument_group("what to prune")
    what.add_argument("--method", default="wanda", help="registered method (see `hf-sparse methods`; default wanda)")
    what.add_argument("--sparsity", type=float, default=None,
                      help="fraction of weights removed per module, in [0, 1) (default 0.5, or 1-N/M for N:M)")
    what.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4 (default unstructured)")
    what.add_argument("--method-option", dest="method_options", action="append", type=parse_method_option,
                      default=[], metavar="KEY=VALUE",
                      help="a method option, repeatable; the value is read as JSON when it parses (64, 0.01, true)")
    what.add_argument("--include", action="append", default=None, metavar="REGEX",
                      help="prune only linears whose full name matches (re.search); repeatable")
    what.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                      help="never prune linears whose full name matches; repeatable")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calibration", default=None, metavar="PATH_OR_DATASET",
                       help="text/JSON file or folder, or a Hugging Face dataset name (all methods but magnitude)")
    calib.add_argument("--calibration-split", default="train", help="dataset split (default train)")
    calib.add_argument("--calibration-column", default="text", help="text column of a dataset/JSON (default text)")
    calib.add_argument("--calibration-subset", default=None, help="dataset configuration name")
    calib.add_argument("--num-samples", type=positive_int, default=128, help="calibration sequences (default 128)")
    calib.add_argument("--sequence-length", type=positive_int, default=2048,
                       help="tokens per calibration sequence (default 2048)")
    calib.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    calib.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default=None, help="device blocks are pruned on (default: first GPU, else in place)")
    run.add_argument("--parallel", action="store_true",
                     help="prune blocks concurrently (only methods with dense propagation, e.g. fista): in worker "
                          "threads, or across processes when started by torchrun/accelerate launch")
    run.add_argument("--num-workers", type=positive_int, default=None, help="worker threads for --parallel")
    run.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="dtype to load the model in (default float32; pruning math is float32 regardless)")
    out = parser.add_argument_group("output and evaluation")
    out.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned model (must not exist)")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it exists (after success only)")
    out.add_argument("--eval-data", default=None, metavar="PATH", help="held-out text file or folder for perplexity")
    out.add_argument("--eval-sequence-length", type=positive_int, default=None,
                     help="perplexity window (default 2048, or the model's context if shorter)")
    out.add_argument("--eval-max-windows", type=positive_int, default=None, help="evaluate on at most N windows")
    out.add_argument("--eval-batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    out.add_argument("--no-eval", action="store_true", help="skip perplexity even if --eval-data is given")
    _add_hub_arguments(parser)
    parser.set_defaults(func=run_prune)
    return parser


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from .integrations.hub import add_hub_arguments
    except ImportError:  # an install without the hub helpers: keep the flags so scripts fail with a clear message
        group = parser.add_argument_group("model card and Hub")
        group.add_argument("--model-card", action=argparse.BooleanOptionalAction, default=None)
        group.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
        return
    add_hub_arguments(parser)


def _sparsity_config(args: argparse.Namespace):
    from . import SparsityConfig

    options: dict[str, Any] = {}
    for key, value in args.method_options:
        options[key] = value
    return SparsityConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, include=args.include,
        exclude=args.exclude, calibration=args.calibration, calibration_split=args.calibration_split,
        calibration_column=args.calibration_column, calibration_subset=args.calibration_subset,
        num_samples=args.num_samples, sequence_length=args.sequence_length, batch_size=args.batch_size,
        seed=args.seed, method_options=options, parallel=args.parallel, num_workers=args.num_workers,
        device=args.device,
    )


def _save(model, tokenizer, directory: Path, args: argparse.Namespace) -> None:
    """Write the checkpoint (and model card, when asked and available) into ``directory``; never pushes."""
    want_card = getattr(args, "model_card", None)
    try:
        from .integrations import hub
    except ImportError as error:
        if want_card or getattr(args, "push_to_hub", None):
            raise ValueError("--model-card/--push-to-hub need hf_sparse.integrations.hub, which this installation "
                             f"lacks ({error}); use --no-model-card") from error
        hub = None
    if hub is not None and want_card is not False:
        hub.save_with_model_card(model, tokenizer, directory, push_to_hub=False,
                                 base_model=getattr(args, "base_model", None), license=getattr(args, "license", None))
    else:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse prune``; returns the numbers it printed."""
    import torch

    from . import prune
    from .engine import distributed
    from .evaluation import perplexity
    from .record import read_record, write_record

    # Everything that can be checked without the model is checked before a possibly long load.
    config = _sparsity_config(args)
    if config.needs_calibration and isinstance(args.calibration, str) and _looks_like_path(args.calibration) \
            and not Path(args.calibration).expanduser().exists():
        raise ValueError(f"--calibration {args.calibration!r} does not exist; give a text/JSON file or folder, "
                         "or a Hugging Face dataset name")
    output = Path(args.output).expanduser()
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {str(output)!r} already exists; choose a new folder or pass --overwrite")
    push_repo = getattr(args, "push_to_hub", None)
    if push_repo:
        if push_repo.count("/") != 1 or push_repo.startswith(("/", ".", "~")) or push_repo.endswith("/"):
            raise ValueError(f"--push-to-hub {push_repo!r} is not a Hub repository id; use org/name")
    # Under torchrun/accelerate launch every process prunes its share of the blocks; one of them (the main process)
    # evaluates, writes the output and prints, the others stop once the pruned weights are shared.
    is_main = True
    if args.parallel and distributed.launched_with_several_processes():
        is_main = distributed.process_state(args.device).is_main_process
    evaluate = bool(args.eval_data) and not args.no_eval and is_main
    eval_texts = _read_eval_texts(args.eval_data) if evaluate else None

    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    config.tokenizer = tokenizer
    eval_length = default_eval_length(model, args.eval_sequence_length)

    def measure() -> float:
        return perplexity(model, tokenizer, eval_texts, sequence_length=eval_length,
                          batch_size=args.eval_batch_size, max_windows=args.eval_max_windows)

    dense_ppl = measure() if evaluate else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    record = prune(model, config, tokenizer=tokenizer)
    prune_seconds = time.perf_counter() - start
    if not is_main:
        return {}
    pruned_ppl = measure() if evaluate else None

    if evaluate:
        record = read_record(model)
        record.evaluation = {**record.evaluation, "dense_perplexity": round(dense_ppl, 4),
                             "pruned_perplexity": round(pruned_ppl, 4), "eval_data": Path(args.eval_data).name,
                             "eval_sequence_length": eval_length}
        if args.eval_max_windows:
            record.evaluation["eval_windows"] = args.eval_max_windows
        write_record(model, record)
    with atomic_output_dir(output, overwrite=args.overwrite) as tmp:
        _save(model, tokenizer, tmp, args)
    if push_repo:
        from .integrations.hub import upload_folder

        # Pushed after the local copy is complete, so a network failure never costs the pruned model.
        upload_folder(output, push_repo, private=getattr(args, "private", None) or None)

    peak_rss = peak_rss_bytes()
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    print_table([
        ("model", str(args.model)),
        ("method", f"{config.method} ({config.pattern}, target sparsity {config.sparsity:.4f})"),
        ("dense perplexity", fmt(dense_ppl)),
        ("pruned perplexity", fmt(pruned_ppl)),
        ("achieved sparsity", f"{record.overall_sparsity:.4f} over {len(record.modules)} modules"),
        ("prune wall time", f"{prune_seconds:.1f} s"),
        ("peak RSS", _format_bytes(peak_rss)),
        ("peak CUDA memory", _format_bytes(peak_cuda)),
        ("saved to", str(output) + (f" (pushed to {push_repo})" if push_repo else "")),
    ])
    return {"dense_perplexity": dense_ppl, "pruned_perplexity": pruned_ppl,
            "overall_sparsity": record.overall_sparsity, "prune_seconds": prune_seconds, "peak_rss": peak_rss,
            "peak_cuda": peak_cuda, "output": str(output)}


# ---------------------------------------------------------------------------------------------------------------
# eval


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="perplexity of a model on held-out text",
                                   description="Print the perplexity of MODEL_OR_DIR on --data (non-overlapping "
                                               "windows unless --stride is smaller than --sequence-length).")
    parser.add_argument("model", metavar="MODEL_OR_DIR", help="local folder or Hub id")
    parser.add_argument("--data", required=True, metavar="PATH", help="held-out text file or folder")
    parser.add_argument("--sequence-length", type=positive_int, default=None,
                        help="window length (default 2048, or the model's context if shorter)")
    parser.add_argument("--stride", type=positive_int, default=None, help="window step (default: sequence length)")
    parser.add_argument("--max-windows", type=positive_int, default=None, help="evaluate on at most N windows")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse eval``; returns the perplexity and settings it printed."""
    from .evaluation import perplexity
    from .record import read_record

    texts = _read_eval_texts(args.data)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    length = default_eval_length(model, args.sequence_length)
    if args.stride is not None and args.stride > length:
        raise ValueError(f"--stride {args.stride} is larger than the sequence length {length}; allowed: 1..{length}")
    ppl = perplexity(model, tokenizer, texts, sequence_length=length, stride=args.stride,
                     batch_size=args.batch_size, max_windows=args.max_windows)
    record = read_record(model)
    rows = [("model", str(args.model)), ("data", str(args.data)),
            ("windows", f"{length} tokens, stride {args.stride or length}"
                        + (f", at most {args.max_windows}" if args.max_windows else "")),
            ("sparsity", f"{record.overall_sparsity:.4f} ({record.method}, {record.pattern})" if record else "dense"),
            ("perplexity", f"{ppl:.2f}")]
    print_table(rows)
    return {"perplexity": ppl, "sequence_length": length}


# ---------------------------------------------------------------------------------------------------------------
# methods


def add_methods_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("methods", help="list the registered pruning methods and their options")
    parser.set_defaults(func=run_methods)
    return parser


def describe_methods() -> str:
    """Every registered method with its patterns, calibration needs and options (from the options dataclass help).

    >>> "sparsegpt" in describe_methods()
    True
    """
    from .methods import METHODS

    lines = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        needs = "needs calibration" if cls.statistics else "no calibration"
        patterns = ", ".join("N:M" if p == "n:m" else p for p in cls.supports_patterns)
        lines.append(f"{name}: {summary}")
        lines.append(f"  patterns: {patterns}; {needs}" + ("; --parallel supported" if cls.propagate_dense else ""))
        fields = dataclasses.fields(cls.options_class)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            help_text = f.metadata.get("help", "")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"  --method-option {f.name}=<{kind}> (default {json.dumps(default)}): {help_text}")
        if not fields:
            lines.append("  (no options)")
    return "\n".join(lines)


def run_methods(args: argparse.Namespace) -> None:
    print(describe_methods())


# ---------------------------------------------------------------------------------------------------------------
# recover (lives in hf_sparse.recovery; imported only when asked for, since it pulls in peft)


def _add_recover_command(subparsers, wanted: bool) -> None:
    help_text = "LoRA recovery that keeps the sparsity, merged into a new checkpoint"
    if wanted:
        try:
            from .recovery import add_recover_command
        except ImportError as error:
            message = f"`hf-sparse recover` needs hf_sparse.recovery, which could not be imported: {error}"
        else:
            add_recover_command(subparsers)
            return
    else:
        message = None
    # Listed in `hf-sparse --help` without importing peft; only reached when recovery is unavailable.
    parser = subparsers.add_parser("recover", help=help_text, add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_unavailable, unavailable=message or "`hf-sparse recover` is unavailable")


def _unavailable(args: argparse.Namespace) -> None:
    raise ValueError(args.unavailable)


# ---------------------------------------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Post-training pruning of Hugging Face causal LMs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_prune_command(subparsers)
    add_eval_command(subparsers)
    add_methods_command(subparsers)
    _add_recover_command(subparsers, wanted=argv is None or "recover" in argv)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hf_sparse").setLevel(level)
    if verbosity >= 2:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-sparse``; returns the exit code (0, or 2 for bad input).

    >>> main(["methods"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        args.func(args)
    except ValueError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        logger.debug("traceback of the error above", exc_info=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
