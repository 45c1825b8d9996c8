"""``hf-sparse recover MODEL_DIR --data train.txt --teacher base --output recovered/``: distil (or LM-train) a pruned
model back toward its dense model, keeping its sparsity and shapes, and save it with a model card."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .common import (add_model_arguments, add_output_arguments, check_output, evaluation_entry,
                     load_model_and_tokenizer, positive_int, print_table, read_eval_texts, save_output)

HELP = "recover a pruned model by distillation from its dense model (or LM loss), sparsity and shapes kept"
DESCRIPTION = ("Train a pruned checkpoint on text - by distillation from the dense model it was pruned from "
               "(--teacher base, the default), or on the language-modelling loss (--objective lm) - with "
               "sparsity-keeping LoRA (merged) or full fine-tuning, and save a checkpoint exactly as sparse as "
               "MODEL_DIR (same zeros, same N:M groups, same shapes), with a model card. Multi-GPU: run the same "
               "command under `accelerate launch -m hf_sparse recover ...` or torchrun.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..integrations.peft import MODES
    from ..recovery import METHODS, OBJECTIVES, RecoveryConfig
    from ..recovery.config import TEACHER_DTYPES

    defaults = RecoveryConfig()
    parser.add_argument("model", metavar="MODEL_DIR", help="a pruned checkpoint (local folder or Hub id)")
    parser.add_argument("--data", required=True,
                        help="training text: .txt/.json/.jsonl file, folder or dataset name (packed into sequences; "
                             "a held-out part is never trained on)")
    group = parser.add_argument_group("objective and teacher")
    group.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                       help="distill+lm: KL to the teacher + next-token loss; distill: KL only; lm: next-token "
                            "loss only, no teacher "
                            "(default: %(default)s)")
    group.add_argument("--teacher", default=defaults.teacher,
                       help="'base' = the dense model the record names (a folder of that name here or beside "
                            "MODEL_DIR, checked against the record's hash), a folder or a Hub id "
                            "(default: %(default)s)")
    group.add_argument("--force-teacher", action="store_true",
                       help="use the teacher even if its hash differs from the record's base model")
    group.add_argument("--teacher-dtype", choices=TEACHER_DTYPES, default=None,
                       help="load the teacher in this dtype (default: the student's)")
    group.add_argument("--teacher-device-map", default=None,
                       help="transformers device_map for the teacher, e.g. auto or cuda:1 (default: the student's "
                            "device)")
    group.add_argument("--teacher-correction", type=int, default=defaults.teacher_correction_steps, metavar="STEPS",
                       help="first train the teacher STEPS steps on --data with the LM loss, then distil from it "
                            "(Minitron's teacher correction); use it when --data is not what the teacher was trained "
                            "on (default: %(default)s = off)")
    group.add_argument("--temperature", type=float, default=defaults.temperature,
                       help="softmax temperature of the KL term (default: %(default)s)")
    group.add_argument("--top-k", type=positive_int, default=defaults.top_k,
                       help="distil the teacher's k most likely tokens, the rest as one bucket (default: the whole "
                            "vocabulary)")
    group.add_argument("--kd-weight", type=float, default=defaults.kd_weight,
                       help="weight of the KL term (default: %(default)s)")
    group.add_argument("--lm-weight", type=float, default=defaults.lm_weight,
                       help="weight of the LM term with --objective lm or distill+lm (default: %(default)s)")
    group.add_argument("--hidden-weight", type=float, default=defaults.hidden_weight,
                       help="weight of the intermediate hidden-state loss, blocks mapped through the record "
                            "(default: %(default)s = off)")
    group = parser.add_argument_group("training")
    group.add_argument("--train", choices=METHODS, default=defaults.method,
                       help="lora: sparsity-keeping LoRA, merged; full: every weight, zeros re-applied after each "
                            "step (default: %(default)s)")
    group.add_argument("--mode", choices=MODES, default=defaults.mode,
                       help="LoRA: masked = mask in the training forward too; merge = mask at merge only "
                            "(default: %(default)s)")
    group.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank (default: %(default)s)")
    group.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    group.add_argument("--target-modules", default=defaults.target_modules,
                       help="LoRA target_modules: 'all-linear' or a comma-separated list (default: %(default)s)")
    group.add_argument("--steps", type=positive_int, default=defaults.steps,
                       help="optimizer steps (default: %(default)s)")
    group.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: 1e-3 for LoRA, 1e-4 for full fine-tuning)")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                       help="sequences per step and process (default: %(default)s)")
    group.add_argument("--sequence-length", type=positive_int, default=defaults.sequence_length,
                       help="tokens per training sequence (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed,
                       help="seed for the data order and adapter init (default: %(default)s)")
    group.add_argument("--checkpoint-dir", default=None,
                       help="keep resumable training checkpoints here (default: a temporary folder)")
    group.add_argument("--save-steps", type=positive_int, default=None,
                       help="checkpoint every N steps (needs --checkpoint-dir)")
    group.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in --checkpoint-dir (after a kill)")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-data", default=None,
                       help="held-out text: print and record test perplexity before/after")
    group.add_argument("--eval-sequence-length", type=positive_int, default=256,
                       help="perplexity window length (default: %(default)s)")
    group.add_argument("--max-windows", type=positive_int, default=None,
                       help="evaluate on at most this many windows (default: all)")
    group.add_argument("--control", action="store_true",
                       help="with --eval-data: also train the dense teacher the same way on the LM loss and record "
                            "its perplexity (separates recovery from adaptation to the training text); a teacher "
                            "corrected for all --steps is that model already and is reused")
    add_model_arguments(parser, dtypes=("float32", "bfloat16", "float16"))
    parser.add_argument("--save-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the saved checkpoint: auto keeps the input checkpoint's own (a float16 model "
                             "stays float16; training runs in --dtype)")
    add_output_arguments(parser)


def _target_modules(text: str) -> str | list[str]:
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(objective=args.objective, teacher=args.teacher, force_teacher=args.force_teacher,
                teacher_dtype=args.teacher_dtype, teacher_device_map=args.teacher_device_map,
                teacher_correction_steps=args.teacher_correction,
                temperature=args.temperature, top_k=args.top_k, kd_weight=args.kd_weight, lm_weight=args.lm_weight,
                hidden_weight=args.hidden_weight, method=args.train, mode=args.mode, rank=args.rank,
                alpha=args.alpha, target_modules=_target_modules(args.target_modules), steps=args.steps,
                learning_rate=args.lr, batch_size=args.batch_size, sequence_length=args.sequence_length,
                seed=args.seed, checkpoint_dir=args.checkpoint_dir, save_steps=args.save_steps, resume=args.resume)


def _save_dtype(args: argparse.Namespace):
    """The dtype to save in: ``--save-dtype``, or with ``auto`` the input checkpoint's own (float32 for a GGUF file,
    whose weights were dequantized, or when the config names none)."""
    import torch
    from transformers import AutoConfig

    if args.save_dtype != "auto":
        return getattr(torch, args.save_dtype)
    if args.gguf_file:
        return torch.float32
    own = getattr(AutoConfig.from_pretrained(args.model), "dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if isinstance(own, torch.dtype) and own.is_floating_point else torch.float32


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-sparse recover``; returns the numbers it printed (for tests and scripts)."""
    from ..evaluation import perplexity
    from ..record import read_record, write_record
    from ..recovery import RecoveryConfig, recover
    from ..recovery.teacher import find_base

    if args.control and not args.eval_data:
        raise ValueError("--control compares test perplexities: give --eval-data too")
    config = RecoveryConfig(**_options(args))  # every bad option refused before the model loads
    check_output(args)
    texts = read_eval_texts(args.eval_data) if args.eval_data else None
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, gguf_file=args.gguf_file)
    record = read_record(model)
    if record is None:
        raise ValueError(f"{args.model!r} has no sparsity_config record: it was not pruned by hf_sparse (prune it "
                         "first with `hf-sparse prune`)")

    def measure(m) -> float:
        return perplexity(m, tokenizer, texts, sequence_length=args.eval_sequence_length, max_windows=args.max_windows)

    pruned_ppl = measure(model) if texts is not None else None
    # A teacher corrected for as many steps as the student trains, in the student's dtype on one device, is the
    # dense model given the same training: kept, it is the control, and the dense model is trained once, not twice.
    reuse_teacher = bool(args.control and config.uses_teacher and config.teacher_correction_steps == config.steps
                         and config.teacher_dtype is None and config.teacher_device_map is None)
    result = recover(model, tokenizer, args.data, config, keep_teacher=reuse_teacher)
    perplexities: dict[str, float] = {}
    control = None
    if texts is not None:
        perplexities = {"pruned": pruned_ppl, "recovered": measure(result.model)}
        if args.control:
            source = find_base(record, args.model) if args.teacher == "base" else args.teacher
            dense, _ = load_model_and_tokenizer(source, args.dtype)
            perplexities["dense"] = measure(dense)
            if reuse_teacher:
                control = measure(result.teacher)
                result.teacher = None
            else:
                trained = recover(dense, tokenizer, args.data, config, objective="lm", dense_control=True,
                                  checkpoint_dir=None, save_steps=None, resume=False, teacher_correction_steps=0)
                control = measure(trained.model)
            del dense
            updated = read_record(result.model)
            updated.recovery = {**updated.recovery, "control_perplexity": round(control, 4)}
            write_record(result.model, updated)
    evaluation = evaluation_entry(perplexities, args.eval_data, args.eval_sequence_length, args.max_windows) \
        if texts is not None else None
    result.model.to(_save_dtype(args))  # casting keeps zeros zero: the masks survive it
    output = save_output(result.model, tokenizer, args, evaluation)
    final = read_record(result.model)
    recovery = final.recovery
    last_loss = result.losses[-1] if result.losses else math.nan
    summary: dict[str, Any] = {
        "objective": config.objective, "teacher": recovery.get("teacher"), "train": config.method,
        "steps": config.steps, "tokens": result.tokens, "final_loss": round(last_loss, 4),
        "heldout_perplexity_before": recovery.get("heldout_perplexity_before"),
        "heldout_perplexity_after": recovery.get("heldout_perplexity_after"),
        "overall_sparsity": final.overall_sparsity, "seconds": round(result.seconds, 1), "output": str(output),
        **{f"{stage}_perplexity": round(value, 4) for stage, value in perplexities.items()},
        **({"control_perplexity": round(control, 4)} if control is not None else {}),
    }
    correction = recovery.get("teacher_correction")
    if correction:
        summary["teacher_correction_steps"] = correction["steps"]
    rows = [("objective", config.objective + (f" (teacher {summary['teacher']}" if summary["teacher"] else "") +
             (f", corrected for {correction['steps']} step{'s' * (correction['steps'] != 1)}" if correction else "") +
             (")" if summary["teacher"] else "")),
            ("training", f"{config.method}, {config.steps} steps, {result.tokens:,} tokens, {result.seconds:.0f} s"),
            ("final training loss", f"{last_loss:.4f}"),
            ("held-out perplexity", f"{_ppl(result.perplexity_before)} -> {_ppl(result.perplexity_after)} "
                                    "(held-out part of --data)")]
    if perplexities:
        rows.append(("test perplexity", f"pruned {_ppl(perplexities['pruned'])} -> recovered "
                                        f"{_ppl(perplexities['recovered'])}"))
    if control is not None:
        rows.append(("dense control", f"dense {_ppl(perplexities['dense'])}, dense + same training {_ppl(control)}"))
    rows += [("sparsity", f"{final.overall_sparsity:.4f} (unchanged)"), ("saved to", str(output))]
    print_table(rows)
    return summary
