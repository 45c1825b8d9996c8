"""``hf-sparse bench MODEL [--baseline MODEL] [--prompt-length 512] [--new-tokens 64] [--runs 5] [--json]``"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import add_model_arguments, load_model_and_tokenizer, positive_int

HELP = "speed and memory of generation: prefill and decode tokens/s, time to first token, peak memory"
DESCRIPTION = ("Measure MODEL (and --baseline, alternately in the same process, so the ratio holds on a loaded "
               "machine): a random prompt of --prompt-length tokens is prefilled, then --new-tokens greedy tokens "
               "are decoded with the KV cache. Warm-up runs first, then the median of --runs runs. Prints a "
               "Markdown table (or JSON with --json).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local folder or Hub id of a causal LM")
    parser.add_argument("--baseline", default=None, metavar="MODEL",
                        help="a second model measured alternately with MODEL (e.g. the dense original); the table "
                             "gets a MODEL / baseline column")
    parser.add_argument("--prompt-length", type=positive_int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="tokens decoded (default 64)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="prompts per forward pass (default 1)")
    parser.add_argument("--runs", type=positive_int, default=5, help="measured runs per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs per model, not measured (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_model_arguments(parser)


def _label(source: str) -> str:
    return Path(str(source).rstrip("/")).name or str(source)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse bench``; returns the JSON it printed (or would print with ``--json``)."""
    from ..evaluation.bench import compare, format_table, ratios

    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} is not allowed; 0 or more warm-up runs")
    sources = {_label(args.model): args.model}
    if args.baseline:
        name = _label(args.baseline)
        sources[name if name not in sources else f"{name} (baseline)"] = args.baseline
    models = {}
    for name, source in sources.items():
        models[name], _tokenizer = load_model_and_tokenizer(source, args.dtype, gguf_file=args.gguf_file)
    results = compare(models, prompt_length=args.prompt_length, new_tokens=args.new_tokens, runs=args.runs,
                      warmup=args.warmup, batch_size=args.batch_size, checkpoints=sources, seed=args.seed,
                      show_progress=not args.quiet)
    import torch

    first = next(iter(models.values()))
    dtype = str(next(first.parameters()).dtype).removeprefix("torch.")  # what --dtype (auto: the checkpoint's) gave
    report: dict[str, Any] = {
        "settings": {"prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "runs": args.runs,
                     "warmup": args.warmup, "batch_size": args.batch_size, "dtype": dtype,
                     "threads": torch.get_num_threads(), "device": str(first.device)},
        "results": {r.name: {**r.to_dict(), "source": str(sources[r.name])} for r in results},
    }
    if len(results) == 2:
        report["ratio"] = {"of": results[0].name, "to": results[1].name, **ratios(results[0], results[1])}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(results))
        settings = report["settings"]
        print(f"\nprompt {settings['prompt_length']} tokens, {settings['new_tokens']} new tokens, batch "
              f"{settings['batch_size']}; median of {settings['runs']} runs after {settings['warmup']} warm-up, "
              f"models alternating; {settings['dtype']} on {settings['device']}, {settings['threads']} threads")
    return report
