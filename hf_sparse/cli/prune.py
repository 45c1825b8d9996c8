"""``hf-sparse prune MODEL --method wanda --pattern 2:4 --calibration calib.txt --output pruned/``"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import shown
from .common import (add_calibration_arguments, add_model_arguments, add_output_arguments, add_perplexity_arguments,
                     add_selection_arguments, check_calibration_given, check_calibration_path, check_eval_length,
                     check_eval_length_given, check_output, default_calibration_length, default_eval_length,
                     evaluation_entry, format_bytes, load_model_and_tokenizer, parse_profile_option,
                     parse_sparsity_profile, peak_rss_bytes, positive_int, print_table, read_eval_texts, save_output)

HELP = "prune a model and save it (with perplexity before/after, if --eval-data is given)"
DESCRIPTION = ("Load MODEL (local folder or Hub id), prune it with hf_sparse.prune, measure perplexity before and "
               "after on --eval-data, and save model + tokenizer (+ model card) to --output. The output folder "
               "appears only once it is complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local folder or Hub id of a causal LM")
    what = parser.add_argument_group("what to prune")
    what.add_argument("--method", default="wanda", help="registered method (see `hf-sparse methods`; default wanda)")
    what.add_argument("--sparsity", type=float, default=None,
                      help="fraction of weights removed per module, in [0, 1) (default 0.5, or 1-N/M for N:M)")
    what.add_argument("--pattern", default="unstructured",
                      help="'unstructured', N:M such as 2:4, or 'structured' (flap, shortgpt, sleb, pip remove whole "
                           "heads, channels or blocks; --sparsity is then the fraction of decoder-block parameters) "
                           "(default unstructured)")
    what.add_argument("--sparsity-profile", type=parse_sparsity_profile, default="uniform",
                      metavar="uniform|owl|FILE.json",
                      help="how the sparsity is shared out over the blocks: uniform (default), owl (outlier-weighted, "
                           "same overall sparsity), or a JSON file {block index or module regex: sparsity}; with "
                           "--pattern structured (flap, pip, disp_llm) each block loses its share of its own "
                           "parameters, and a JSON file takes block indices only")
    what.add_argument("--profile-option", dest="profile_options", action="append", type=parse_profile_option,
                      default=[], metavar="KEY=VALUE", help="a sparsity-profile option, repeatable (owl: m=5, lambda=0.08)")
    add_selection_arguments(what)
    add_calibration_arguments(parser, mix=True)
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default=None, help="device blocks are pruned on (default: first GPU, else in place)")
    run.add_argument("--parallel", action="store_true",
                     help="prune blocks concurrently (only methods with dense propagation, e.g. fista): in worker "
                          "threads, or across processes when started by torchrun/accelerate launch")
    run.add_argument("--num-workers", type=positive_int, default=None, help="worker threads for --parallel")
    add_model_arguments(run)
    add_output_arguments(parser)
    parser.add_argument("--compressed", action="store_true",
                        help="store the pruned linears compactly (N:M values + positions, or bitmask + values; "
                             "loads with hf_sparse imported, `hf-sparse decompress` exports a dense copy)")
    add_perplexity_arguments(parser)


def sparsity_config(args: argparse.Namespace):
    """The :class:`hf_sparse.SparsityConfig` the options describe (validated on construction)."""
    from .. import SparsityConfig

    if args.num_workers is not None and not args.parallel:
        raise ValueError(f"--num-workers {args.num_workers} needs --parallel (blocks are pruned one after another "
                         "without it)")
    sources = args.calibration or []
    for source in sources:  # before the config, whose mix check would name the path less helpfully
        check_calibration_path(source)
    weights = args.calibration_weights
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"--calibration-weight was given {len(weights)} time(s) for {len(sources)} --calibration "
                         "source(s): give one weight per source, in the same order")
    if len(sources) > 1 and weights is None:
        weights = [1.0] * len(sources)  # several sources on a command line are a mix, never raw texts
    calibration = sources if weights is not None else (sources[0] if sources else None)
    return SparsityConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, include=args.include,
        sparsity_profile=args.sparsity_profile, profile_options=dict(args.profile_options),
        exclude=args.exclude, calibration=calibration, calibration_weights=weights, target_data=args.target_data,
        calibration_split=args.calibration_split,
        calibration_column=args.calibration_column, calibration_subset=args.calibration_subset,
        num_samples=args.num_samples, sequence_length=default_calibration_length(args), batch_size=args.batch_size,
        seed=args.seed, method_options=dict(args.method_options), parallel=args.parallel,
        num_workers=args.num_workers, device=args.device,
    )


def check_profile_before_loading(args: argparse.Namespace, config) -> None:
    """An explicit ``--sparsity-profile`` is checked against the model's layout before its weights load: on an
    empty (meta-device) skeleton built from ``config.json`` alone. A model whose config cannot be read is left to
    the load, which reports it."""
    if isinstance(config.sparsity_profile, str) or args.gguf_file:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..integrations.transformers import check_plan_before_loading

    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError):
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    check_plan_before_loading(skeleton, config)


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no such file either way
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse prune``; returns the numbers it printed."""
    import torch

    from .. import prune
    from ..engine import distributed
    from ..evaluation import perplexity

    # Everything that can be checked without the model is checked before a possibly long load.
    config = sparsity_config(args)
    check_calibration_given([config.method], args.calibration, config.sparsity_profile)
    if args.compressed and config.parsed_pattern.is_structured:
        raise ValueError("--compressed stores the zeros of pruned linears compactly; --pattern structured makes the "
                         "matrices smaller instead, so there is nothing to compress: drop --compressed")
    if args.target_data is not None and not _exists(args.target_data):
        raise ValueError(f"--target-data {shown(args.target_data)} does not exist; give a text/JSON file or folder")
    check_eval_length_given(args.eval_sequence_length, "--eval-sequence-length")
    check_output(args)
    # Under torchrun/accelerate launch every process prunes its share of the blocks; one of them (the main process)
    # evaluates, writes the output and prints, the others stop once the pruned weights are shared.
    is_main = True
    if args.parallel and distributed.launched_with_several_processes():
        is_main = distributed.process_state(args.device).is_main_process
    evaluate = bool(args.eval_data) and not args.no_eval and is_main
    eval_texts = read_eval_texts(args.eval_data) if evaluate else None

    check_profile_before_loading(args, config)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    config.tokenizer = tokenizer
    eval_length = default_eval_length(model, args.eval_sequence_length)
    if evaluate:
        check_eval_length(model, eval_length, "--eval-sequence-length")

    def measure() -> float:
        return perplexity(model, tokenizer, eval_texts, sequence_length=eval_length,
                          batch_size=args.eval_batch_size, max_windows=args.eval_max_windows,
                          show_progress=not args.quiet)

    dense_ppl = measure() if evaluate else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    record = prune(model, config, tokenizer=tokenizer, show_progress=not args.quiet)
    prune_seconds = time.perf_counter() - start
    if not is_main:
        return {}
    pruned_ppl = measure() if evaluate else None
    evaluation = evaluation_entry({"dense": dense_ppl, "pruned": pruned_ppl}, args.eval_data, eval_length,
                                  args.eval_max_windows) if evaluate else None
    output = save_output(model, tokenizer, args, evaluation)

    peak_rss = peak_rss_bytes()
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    print_table([
        ("model", str(args.model) + (f" ({args.gguf_file})" if args.gguf_file else "")),
        ("method", f"{config.method} ({config.pattern}, target sparsity {config.sparsity:.4f})"),
        ("dense perplexity", fmt(dense_ppl)),
        ("pruned perplexity", fmt(pruned_ppl)),
        ("achieved sparsity", f"{record.overall_sparsity:.4f} of the decoder-block parameters (structured)"
         if record.structure is not None else f"{record.overall_sparsity:.4f} over {len(record.modules)} modules"),
        ("prune wall time", f"{prune_seconds:.1f} s ({torch.get_num_threads()} threads)"),
        ("peak RSS", format_bytes(peak_rss)),
        ("peak CUDA memory", format_bytes(peak_cuda)),
        ("saved to", str(output) + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else "")),
    ])
    return {"dense_perplexity": dense_ppl, "pruned_perplexity": pruned_ppl,
            "overall_sparsity": record.overall_sparsity, "prune_seconds": prune_seconds, "peak_rss": peak_rss,
            "peak_cuda": peak_cuda, "output": str(output)}
