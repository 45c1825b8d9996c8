"""``hf-sparse eval MODEL_OR_DIR --data test.txt --sequence-length 256 [--tasks arc_easy,piqa --limit 500]``"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import shown
from .common import (add_model_arguments, check_eval_length, check_eval_length_given, default_eval_length,
                     evaluation_entry, load_model_and_tokenizer, positive_int, print_table, read_eval_texts)

HELP = "perplexity on held-out text and zero-shot accuracy on lm-eval-harness tasks"
DESCRIPTION = ("Print the perplexity of MODEL_OR_DIR on --data (non-overlapping windows unless --stride is smaller "
               "than --sequence-length) and/or its lm-eval-harness scores on --tasks (needs the extra "
               "hf-sparse[eval]); the model is loaded once and handed to lm-eval as it is. --update-card stores the "
               "numbers in a pruned checkpoint's record and model card.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_DIR", help="local folder or Hub id")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="held-out text file or folder for perplexity (this and/or --tasks)")
    parser.add_argument("--sequence-length", type=positive_int, default=None,
                        help="window length (default 2048, or the model's context if shorter)")
    parser.add_argument("--stride", type=positive_int, default=None, help="window step (default: sequence length)")
    parser.add_argument("--max-windows", type=positive_int, default=None, help="evaluate on at most N windows")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    tasks = parser.add_argument_group("zero-shot tasks (lm-eval-harness)")
    tasks.add_argument("--tasks", type=_task_list, default=None, metavar="TASK[,TASK...]",
                       help="comma-separated lm-eval task names, e.g. arc_easy,arc_challenge,hellaswag,piqa,"
                            "winogrande,boolq")
    tasks.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra task YAML files")
    tasks.add_argument("--limit", type=_limit, default=None, metavar="N",
                       help="at most N documents per task (a fraction if below 1)")
    tasks.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                       help="few-shot examples per prompt (default: each task's own, zero for the usual tasks)")
    tasks.add_argument("--tasks-batch-size", type=positive_int, default=1, help="lm-eval batch size (default 1)")
    parser.add_argument("--update-card", action="store_true",
                        help="store the results in MODEL_OR_DIR's sparsity record and re-write its model card (a "
                             "local checkpoint pruned by hf_sparse; replaced atomically)")
    add_model_arguments(parser)


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"--tasks {shown(text)} is empty; give comma-separated lm-eval task names")
    return tasks


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number; give a document count or a "
                                         "fraction") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; a positive count or a fraction in (0, 1)")
    return int(value) if value >= 1 and value.is_integer() else value


def _is_compact(folder: str) -> bool:
    """Whether a local checkpoint folder is in compact storage (its config.json says so)."""
    import json

    from ..formats.compact import STORAGE_FORMAT

    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == STORAGE_FORMAT


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse eval``; returns the numbers and settings it printed."""
    from ..evaluation import perplexity
    from ..record import read_record

    if args.data is None and not args.tasks:
        raise ValueError("nothing to evaluate: give --data (perplexity) and/or --tasks (lm-eval tasks)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {args.num_fewshot} is not allowed; 0 or more examples")
    if args.update_card and not Path(args.model).expanduser().is_dir():
        raise ValueError(f"--update-card needs a local checkpoint folder; {shown(args.model)} is not one")
    check_eval_length_given(args.sequence_length, "--sequence-length")
    texts = read_eval_texts(args.data) if args.data else None
    if args.tasks:
        from ..evaluation.zero_shot import check_available

        check_available()  # before the model load
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    record = read_record(model)
    if args.update_card and record is None:
        raise ValueError(f"--update-card: {shown(args.model)} has no sparsity record (not pruned by hf_sparse)")
    rows = [("model", str(args.model) + (f" ({args.gguf_file})" if args.gguf_file else "")),
            ("sparsity", f"{record.overall_sparsity:.4f} ({record.method}, {record.pattern})" if record else "dense")]
    result: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    stage = ("recovered" if record.recovery else "pruned") if record else "dense"
    if texts is not None:
        length = default_eval_length(model, args.sequence_length)
        check_eval_length(model, length, "--sequence-length")
        if args.stride is not None and args.stride > length:
            raise ValueError(f"--stride {args.stride} is larger than the sequence length {length}; "
                             f"allowed: 1..{length}")
        ppl = perplexity(model, tokenizer, texts, sequence_length=length, stride=args.stride,
                         batch_size=args.batch_size, max_windows=args.max_windows, show_progress=not args.quiet)
        rows += [("data", str(args.data)),
                 ("windows", f"{length} tokens, stride {args.stride or length}"
                             + (f", at most {args.max_windows}" if args.max_windows else "")),
                 ("perplexity", f"{ppl:.2f}")]
        result.update(perplexity=ppl, sequence_length=length)
        if args.stride is None:  # the card describes non-overlapping windows only
            evaluation.update(evaluation_entry({stage: ppl}, args.data, length, args.max_windows))
    if args.tasks:
        from ..evaluation.zero_shot import zero_shot, zero_shot_entry

        scores = zero_shot(model, tokenizer, args.tasks, include_path=args.include_path, limit=args.limit,
                           num_fewshot=args.num_fewshot, batch_size=args.tasks_batch_size,
                           show_progress=not args.quiet)
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    stderr = metrics.get(f"{metric}_stderr")
                    rows.append((f"{task} {metric}", f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "")))
        result["tasks"] = scores
        evaluation.update(zero_shot_entry(scores, stage, limit=args.limit, num_fewshot=args.num_fewshot))
    print_table(rows)
    if args.update_card:
        from ..integrations import hub

        # A compact checkpoint stays compact (with its storage entry); a dense one stays dense.
        card = hub.save_with_model_card(model, tokenizer, args.model, evaluation=evaluation, overwrite=True,
                                        compressed=_is_compact(args.model))
        print(f"updated {card.parent} (record and {card.name})")
    return result
