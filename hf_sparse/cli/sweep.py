"""``hf-sparse sweep MODEL --methods wanda,sparsegpt --sparsities 0.3,0.5,0.6,0.7 [--patterns 2:4] --output DIR``"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import shown
from .common import (add_calibration_arguments, add_model_arguments, add_perplexity_arguments,
                     add_selection_arguments, check_calibration_given, check_eval_length, default_eval_length,
                     load_model_and_tokenizer, read_eval_texts)

HELP = "prune at many methods and sparsities, evaluate each; a table, results.csv and a plot (resumable)"
DESCRIPTION = ("Prune MODEL once per setting (every method of --methods at every level of --sparsities, plus one "
               "point per N:M pattern of --patterns), reusing one set of calibration windows and one dense "
               "evaluation; measure perplexity on --eval-data; print the table and write DIR/results.csv and "
               "DIR/sweep.png (with matplotlib). Each result is saved as soon as it is measured: run the same "
               "command again after an interruption and it continues where it stopped.")


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{shown(text)} is empty; give comma-separated values")
    return items


def _sparsity_list(text: str) -> list[float]:
    values = []
    for item in _comma_list(text):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(item)} is not a number; sparsities are in [0, 1)") from None
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"sparsity {value} is not allowed; sparsities are in [0, 1)")
        values.append(value)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local folder or Hub id of a causal LM")
    what = parser.add_argument_group("settings")
    what.add_argument("--methods", type=_comma_list, default=["wanda", "sparsegpt"],
                      help="comma-separated registered methods (default wanda,sparsegpt)")
    what.add_argument("--sparsities", type=_sparsity_list, default=[0.3, 0.5, 0.6, 0.7],
                      help="comma-separated unstructured sparsities (default 0.3,0.5,0.6,0.7)")
    what.add_argument("--patterns", type=_comma_list, default=["unstructured"],
                      help="comma-separated patterns: 'unstructured' (swept over --sparsities) and N:M such as 2:4 "
                           "(one point each); default unstructured. '--patterns 2:4' alone sweeps only 2:4; "
                           "'--patterns unstructured,2:4' both")
    add_selection_arguments(what)
    what.add_argument("--device", default=None, help="device blocks are pruned on (default: first GPU, else in place)")
    add_calibration_arguments(parser)
    add_model_arguments(parser)
    add_perplexity_arguments(parser, required=True)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="folder for results.csv, sweep.json and sweep.png; an existing sweep there is resumed")
    out.add_argument("--restart", action="store_true", help="discard the results already in DIR and start over")
    out.add_argument("--no-plot", action="store_true", help="write the CSV only")


def check_output_folder(args: argparse.Namespace) -> None:
    """The sweep's folder: never a file, never the model's own folder (results.csv and pictures would land in it)."""
    from pathlib import Path

    from ..saving import check_not_the_input

    if not str(args.output).strip():
        raise ValueError("--output is empty; give the folder for the sweep's results")
    check_not_the_input(args.output, args.model, label="--output", source_label="the input model")
    if Path(args.output).expanduser().exists() and not Path(args.output).expanduser().is_dir():
        raise ValueError(f"--output {shown(args.output)} is a file; give a folder for the sweep's results")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse sweep``; returns the points it printed."""
    from ..plots import INSTALL_HINT, plots_available
    from ..evaluation.sweep import PLOT_NAME, RESULTS_NAME, format_sweep_table, run_sweep
    from ..methods import get_method_class
    from .prune import sparsity_config

    # The base configuration is every option but method/pattern/sparsity; run_sweep validates each setting. The
    # sweep has one calibration source and the uniform profile: the options prune has beyond those take no value here.
    check_calibration_given(args.methods, args.calibration)
    check_output_folder(args)
    base = sparsity_config(argparse.Namespace(**{
        **vars(args), "method": args.methods[0], "sparsity": None, "pattern": "unstructured", "parallel": False,
        "num_workers": None, "calibration": [args.calibration] if args.calibration else None,
        "calibration_weights": None, "target_data": None, "sparsity_profile": "uniform", "profile_options": []}))
    for method in args.methods:
        get_method_class(method)  # an unknown name is refused before the load, naming the registered ones
    texts = read_eval_texts(args.eval_data)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    base.tokenizer = tokenizer
    check_eval_length(model, default_eval_length(model, args.eval_sequence_length), "--eval-sequence-length")
    plot = not args.no_plot and plots_available()
    points = run_sweep(model, tokenizer, base, args.methods, args.sparsities, texts, args.output,
                       patterns=args.patterns, eval_sequence_length=default_eval_length(model, args.eval_sequence_length),
                       eval_max_windows=args.eval_max_windows, eval_batch_size=args.eval_batch_size,
                       model_name=args.model.rstrip("/").rsplit("/", 1)[-1], restart=args.restart, plot=plot,
                       show_progress=not args.quiet)
    print(format_sweep_table(points))
    print(f"\nwrote {args.output}/{RESULTS_NAME}" + (f" and {args.output}/{PLOT_NAME}" if plot else
                                                      "" if args.no_plot else f" (no plot: {INSTALL_HINT})"))
    return {"points": points}

