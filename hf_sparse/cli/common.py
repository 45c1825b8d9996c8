"""What the ``hf-sparse`` subcommands share: argument types, loading a model, evaluation data, the output options
and the one save path (:func:`hf_sparse.saving.save_checkpoint`, through the model card when one is written)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import shown

DTYPES = ("float32", "float16", "bfloat16", "auto")
PROG = "hf-sparse"


def parse_method_option(text: str, flag: str = "--method-option", example: str = "block_size=64") -> tuple[str, Any]:
    """``"block_size=64"`` -> ``("block_size", 64)``; the value is JSON when it parses, else the raw string.

    >>> parse_method_option("dampening=0.02"), parse_method_option("init=wanda"), parse_method_option("per_row=true")
    (('dampening', 0.02), ('init', 'wanda'), ('per_row', True))
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{flag} {shown(text)} must look like key=value, e.g. {example}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes on the command line
    return key, value


def parse_profile_option(text: str) -> tuple[str, Any]:
    """``--profile-option`` values: ``"lambda=0.08"`` -> ``("lambda", 0.08)``."""
    return parse_method_option(text, "--profile-option", "lambda=0.08")


def parse_sparsity_profile(text: str) -> str | dict[str, float]:
    """``--sparsity-profile`` values: ``uniform``, ``owl``, or a JSON file holding an explicit profile
    (``{"0": 0.4, "mlp\\.down_proj": 0.6}``: block index or module-name regular expression -> sparsity).

    >>> parse_sparsity_profile("owl")
    'owl'
    """
    path = Path(text).expanduser()
    if not path.is_file():
        if text.endswith(".json") or "/" in text or path.is_dir():
            raise argparse.ArgumentTypeError(f"--sparsity-profile {shown(text)} is not a JSON file (a profile name "
                                             "such as uniform or owl, or a JSON file of block index or module-name "
                                             "regex -> sparsity, is allowed)")
        return text  # a profile name: SparsityConfig checks it against the registered profiles
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"--sparsity-profile {shown(text)} is not valid JSON: {error}") from None
    if not isinstance(profile, dict):
        raise argparse.ArgumentTypeError(f"--sparsity-profile {shown(text)} must hold a JSON object, got "
                                         f"{type(profile).__name__}")
    return profile


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1.

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer; a positive integer is required") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; a positive integer is required")
    return value


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage`` reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_bytes(n: int | None) -> str:
    """``1536 * 2**20`` -> ``'1.50 GiB'``; ``None`` -> ``'-'``.

    >>> format_bytes(3 * 2**20), format_bytes(None)
    ('3 MiB', '-')
    """
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_table(rows: Sequence[tuple[str, str]], file=None) -> None:
    """A two-column plain-text table on stdout (the CLI's output; logs and progress go to stderr)."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}", file=file or sys.stdout)


# ---------------------------------------------------------------------------------------------------------------
# Arguments every command has


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (used by every subcommand and by the benchmark scripts in ``examples/``)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: $HF_SPARSE_NUM_THREADS or $OMP_NUM_THREADS if set, "
                             "else the CPUs not busy with other work, at least 1; give N for reproducible timings)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's thread count from ``args.threads`` (see :mod:`hf_sparse.threads`); returns it."""
    from ..threads import set_num_threads

    return set_num_threads(getattr(args, "threads", None))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def add_model_arguments(parser: argparse.ArgumentParser, dtypes: Sequence[str] = DTYPES) -> None:
    """``--dtype`` and ``--gguf-file`` for the positional MODEL. The default is the checkpoint's own dtype (``auto``),
    so a float16 checkpoint stays float16 through every command; commands whose ``dtypes`` lack ``auto`` keep
    float32."""
    default = "auto" if "auto" in dtypes else "float32"
    parser.add_argument("--dtype", choices=dtypes, default=default,
                        help="dtype to load and save the model in (default: " + (
                            "auto, the checkpoint's own, e.g. float16 stays float16; float32 for a GGUF file"
                            if default == "auto" else default) + "; pruning math is float32 regardless)")
    parser.add_argument("--gguf-file", default=None, metavar="FILE",
                        help="load MODEL's GGUF file FILE (a name inside the MODEL folder or Hub repo); its weights "
                             "are dequantized to --dtype, the tokenizer comes from the same file")


def torch_dtype(name: str, gguf_file: str | None = None):
    """The ``dtype`` for ``from_pretrained``: ``"auto"`` (the checkpoint's own) or a torch dtype; a GGUF file has no
    dtype transformers keeps (its weights are dequantized), so ``auto`` means float32 there."""
    import torch

    if name == "auto":
        return torch.float32 if gguf_file else "auto"
    return getattr(torch, name)


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", gguf_file: str | None = None):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder or Hub id (or a GGUF file in it), errors
    as ``ValueError``. A local folder that a killed save left half-swapped is repaired first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..saving import finish_interrupted_save

    if not str(name_or_path).strip():
        raise ValueError("the model is empty; give a local checkpoint folder or a Hub id")
    if Path(name_or_path).expanduser().is_file():
        raise ValueError(f"model {shown(str(name_or_path))} is a file; give the checkpoint folder (or a Hub id)"
                         + ("" if gguf_file else ", and --gguf-file NAME for a GGUF file in it"))
    folder = Path(name_or_path).expanduser()
    if gguf_file and folder.is_dir() and not (folder / gguf_file).is_file():
        found = sorted(path.name for path in folder.glob("*.gguf"))[:5]
        raise ValueError(f"--gguf-file {shown(gguf_file)} is not a file in {shown(str(name_or_path))}"
                         + (f"; GGUF files there: {found}" if found else "; the folder holds no .gguf file"))
    if not str(name_or_path).startswith(("http://", "https://")):
        finish_interrupted_save(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype, gguf_file), **extra)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    except (OSError, ValueError) as error:  # a missing folder, an unknown Hub id, no network, a folder of no model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f"could not load model {shown(str(name_or_path))}" + (
            f" (GGUF file {shown(gguf_file)})" if gguf_file else "")
        if isinstance(error, OSError):  # transformers' words for "not found"
            where += " (a local folder or Hub id is allowed)"
        raise ValueError(f"{where}: {first_line}") from error
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def read_eval_texts(path: str) -> list[str]:
    """Held-out text from a local file or folder (never a download: evaluation data is named explicitly)."""
    from ..calibration import read_texts

    if not Path(path).expanduser().exists():
        raise ValueError(f"evaluation data {shown(path)} does not exist; give a local .txt/.json/.jsonl file or "
                         "folder")
    try:
        return read_texts(str(Path(path).expanduser()))
    except ValueError as error:  # the reader is calibration's: say which data it was
        raise ValueError(f"evaluation data: {str(error).replace('calibration ', '', 1)}") from None


def default_eval_length(model, requested: int | None) -> int:
    """``requested``, or 2048 capped at the model's context (a default, never a silent change of the user's value)."""
    if requested is not None:
        return requested
    context = getattr(model.config, "max_position_embeddings", None)
    return min(2048, context) if context else 2048


def check_eval_length_given(length: int | None, flag: str) -> None:
    """What can be refused of a perplexity window before the model loads: fewer than 2 tokens score nothing."""
    if length is not None and length < 2:
        raise ValueError(f"{flag} {length} is too short to score a token; allowed: 2 up to the model's context")


def check_eval_length(model, length: int, flag: str) -> None:
    """Refuse a perplexity window the model cannot score meaningfully (beyond its context, or under 2 tokens), naming
    the command's flag, before any time is spent."""
    from ..evaluation.perplexity import model_context

    context = model_context(model)
    if length < 2 or (context is not None and length > context):
        allowed = f"2..{context}" if context is not None else "2 or more"
        why = f"longer than the model's context of {context} tokens" if length >= 2 else "too short to score a token"
        raise ValueError(f"{flag} {length} is {why}; allowed: {allowed}")


def evaluation_entry(perplexities: dict[str, float], data: str, sequence_length: int,
                     max_windows: int | None) -> dict[str, Any]:
    """The record's ``evaluation`` keys for perplexities measured by a command (``{"pruned": 62.1}`` ->
    ``pruned_perplexity``) and the setup that produced them (file name only: paths stay private).

    >>> evaluation_entry({"dense": 53.061234}, "/data/test.txt", 256, None)
    {'dense_perplexity': 53.0612, 'eval_data': 'test.txt', 'eval_sequence_length': 256}
    """
    entry: dict[str, Any] = {f"{stage}_perplexity": round(value, 4) for stage, value in perplexities.items()}
    entry.update(eval_data=Path(data).name, eval_sequence_length=sequence_length)
    if max_windows:
        entry["eval_windows"] = max_windows
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Options shared by the commands that prune (prune, sweep)


def add_selection_arguments(group) -> None:
    """``--method-option``, ``--include`` and ``--exclude``: how the method runs and which linears it prunes."""
    group.add_argument("--method-option", dest="method_options", action="append", type=parse_method_option,
                       default=[], metavar="KEY=VALUE",
                       help="a method option, repeatable; the value is read as JSON when it parses (64, 0.01, true)")
    group.add_argument("--include", action="append", default=None, metavar="REGEX",
                       help="prune only linears whose full name matches (re.search); repeatable")
    group.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                       help="never prune linears whose full name matches; repeatable")


def add_calibration_arguments(parser: argparse.ArgumentParser, mix: bool = False) -> None:
    """The calibration options: source, split/column/subset, number and length of windows, batch, seed. With ``mix``,
    ``--calibration`` is repeatable (a mix of sources, ``--calibration-weight`` for their shares) and
    ``--target-data`` asks for the domain check."""
    calib = parser.add_argument_group("calibration")
    if mix:
        calib.add_argument("--calibration", action="append", default=None, metavar="PATH_OR_DATASET",
                           help="text/JSON file or folder, or a Hugging Face dataset name (all methods but "
                                "magnitude); repeat it for a mix (equal shares unless --calibration-weight is given)")
        calib.add_argument("--calibration-weight", dest="calibration_weights", action="append", type=float,
                           default=None, metavar="W",
                           help="share of the windows from each --calibration, in the same order (repeatable)")
        calib.add_argument("--target-data", default=None, metavar="PATH",
                           help="a sample of the text the model will serve: compared with the calibration data "
                                "before pruning, with a warning when they differ enough to hurt (recorded either way)")
    else:
        calib.add_argument("--calibration", default=None, metavar="PATH_OR_DATASET",
                           help="text/JSON file or folder, or a Hugging Face dataset name (all methods but magnitude)")
    calib.add_argument("--calibration-split", default="train", help="dataset split (default train)")
    calib.add_argument("--calibration-column", default="text", help="text column of a dataset/JSON (default text)")
    calib.add_argument("--calibration-subset", default=None, help="dataset configuration name")
    calib.add_argument("--num-samples", type=positive_int, default=128, help="calibration sequences (default 128)")
    calib.add_argument("--sequence-length", type=positive_int, default=None,
                       help="tokens per calibration sequence (default 2048, or the model's context if shorter)")
    calib.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    calib.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")


def default_calibration_length(args: argparse.Namespace) -> int:
    """``--sequence-length``, or 2048 capped at the model's context read from its ``config.json`` (without loading
    the weights); a model whose config cannot be read here gets 2048 and is checked when it loads."""
    if args.sequence_length is not None:
        return args.sequence_length
    if getattr(args, "gguf_file", None):
        return 2048
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError):
        return 2048
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(2048, context) if isinstance(context, int) and context > 0 else 2048


def check_calibration_path(calibration) -> None:
    """Refuse a ``--calibration`` that is meant as a local path but does not exist (before a long model load)."""
    from ..calibration import missing_path

    if missing_path(calibration):
        raise ValueError(f"--calibration {shown(calibration)} does not exist; give a text/JSON file or folder, "
                         "or a Hugging Face dataset name")


def add_perplexity_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--eval-data`` and the options of the perplexity measured before and after pruning (``required``: the
    command always evaluates, so ``--eval-data`` must be given and there is no ``--no-eval``)."""
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-data", default=None, metavar="PATH", required=required,
                            help="held-out text file or folder for perplexity")
    evaluation.add_argument("--eval-sequence-length", type=positive_int, default=None,
                            help="perplexity window (default 2048, or the model's context if shorter)")
    evaluation.add_argument("--max-windows", dest="eval_max_windows", type=positive_int, default=None, metavar="N",
                            help="evaluate on at most N windows (as `hf-sparse eval --max-windows`)")
    # The first spelling, kept working but hidden: it says the same as --max-windows.
    evaluation.add_argument("--eval-max-windows", dest="eval_max_windows", type=positive_int, default=None,
                            action=_DeprecatedAlias, new_flag="--max-windows", help=argparse.SUPPRESS)
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=8,
                            help="windows per forward pass (default 8)")
    if not required:
        evaluation.add_argument("--no-eval", action="store_true", help="skip perplexity even if --eval-data is given")


class _DeprecatedAlias(argparse.Action):
    """An option kept under an old name: stores like the new one and says once, on stderr, which name to use."""

    def __init__(self, *args, new_flag: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{PROG}: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def check_calibration_given(methods: Sequence[str], calibration, profile: Any = "uniform") -> None:
    """Refuse, before loading, a method (or the owl profile) that needs calibration data when ``--calibration`` is
    missing: the library's own error names ``SparsityConfig(calibration=...)``, the command's names the flag."""
    if calibration:
        return
    from ..methods import get_method_class

    needing = [method for method in methods if get_method_class(method).needs_calibration]
    if needing:
        raise ValueError(f"method {needing[0]!r} needs calibration data: give --calibration FILE_OR_FOLDER (a "
                         "text/JSON file or folder, or a Hugging Face dataset name)")
    if profile == "owl":
        raise ValueError("--sparsity-profile owl needs calibration data (Wanda scores of the dense model): give "
                         "--calibration FILE_OR_FOLDER")


# ---------------------------------------------------------------------------------------------------------------
# Output


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output DIR``, ``--overwrite`` and the model card / Hub options (shared by ``prune`` and ``recover``)."""
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="folder for the checkpoint (must not exist); it appears only once it is complete")
    out.add_argument("--overwrite", action="store_true",
                     help="replace --output if it is a checkpoint (a model config.json and weights, nothing else), "
                          "only once the new one is complete; never the input model")
    group = parser.add_argument_group("model card and Hub")
    group.add_argument("--model-card", action=argparse.BooleanOptionalAction, default=True,
                       help="write README.md, a model card generated from the sparsity record (default: on)")
    group.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                       help="also upload the output folder to this Hub repository (org/name)")
    group.add_argument("--private", action="store_true", help="create the Hub repository as private")
    group.add_argument("--license", default=None, help="license for the card's metadata, e.g. apache-2.0")
    group.add_argument("--base-model", default=None,
                       help="Hub id of the model that was pruned, for the card (default: the model path given)")


def check_output(args: argparse.Namespace) -> Path:
    """Everything about the output that can be refused before a long load: the folder (never the input model, nor
    inside it or around it), the Hub id."""
    from ..saving import check_destination, check_not_the_input

    gguf_file = getattr(args, "gguf_file", None)
    source = Path(args.model).expanduser() / gguf_file if gguf_file else args.model  # a GGUF input is one file
    check_not_the_input(args.output, source, label="--output", source_label="the input model")
    output = check_destination(args.output, args.overwrite, label="--output", overwrite_hint="pass --overwrite")
    repo = args.push_to_hub
    if repo and (repo.count("/") != 1 or repo.startswith(("/", ".", "~")) or repo.endswith("/")):
        raise ValueError(f"--push-to-hub {shown(repo)} is not a Hub repository id; use org/name")
    return output


def save_output(model, tokenizer, args: argparse.Namespace, evaluation: dict[str, Any] | None = None) -> Path:
    """Save as the options of :func:`add_output_arguments` say, atomically; push after the local copy is complete,
    so a network failure never costs the saved model. Returns the output folder."""
    from ..integrations import hub
    from ..saving import save_checkpoint

    # check_output() has refused a bad --output with the CLI's wording before the load; this re-checks.
    if args.model_card:
        card = hub.save_with_model_card(model, tokenizer, args.output, evaluation=evaluation, repo_id=args.push_to_hub,
                                        base_model=args.base_model, license=args.license, overwrite=args.overwrite,
                                        compressed=getattr(args, "compressed", False))
        output = card.parent
    else:
        output = save_checkpoint(model, tokenizer, args.output, evaluation=evaluation, overwrite=args.overwrite,
                                 compressed=getattr(args, "compressed", False))
    if args.push_to_hub:
        try:
            hub.upload_folder(output, args.push_to_hub, private=args.private or None)
        except Exception as error:  # noqa: BLE001 - any network or Hub failure: the saved copy is what matters
            text = " ".join(str(error).split()) or type(error).__name__
            raise OSError(f"saved to {output}, but pushing it to {args.push_to_hub!r} failed ({type(error).__name__}: "
                          f"{shown(text, 200)}); push the folder again with huggingface-cli upload") from error
    return output
