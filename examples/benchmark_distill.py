"""Prune -> recover with each objective -> evaluate, side by side at equal tokens and steps.

For every student (a method at a sparsity) it prints one row:

    | student | train | pruned | + LM recovery | + distillation | + distillation, corrected teacher |
      dense + same training | dense | gap closed ... | CPU s/step ... | step ratio ... | peak RSS ... |

"dense + same training" is the dense model given exactly the training the students get (LM loss, same tokens and
steps, LoRA or full): it separates recovery from adaptation to the training text. It is also the *corrected teacher*
of Minitron's recipe (``recover(..., teacher_correction_steps=steps)`` trains exactly this model), so the
``distill-corrected`` objective distils from it; its training is a one-time cost per teacher and data, shared by
every student, printed once. "gap closed" is the share of the pruned-to-dense (untouched) perplexity gap that an
objective wins back; "step ratio" the time per training step of distillation over LM recovery (the teacher only runs
forward), from the process's CPU time (run with one thread, so that other jobs on a shared machine do not distort
it). Peak memory is the largest resident memory of the process during each training run.

    python examples/benchmark_distill.py                                  # 7M model, every row, LoRA
    python examples/benchmark_distill.py --rows flap:0.3 --train lora,full --steps 100
    python examples/benchmark_distill.py --model smollm2 --rows flap:0.3 --eval-windows 64 --steps 60 \\
        --batch-size 4 --threads 1                                        # the SmolLM2 test-bed (needs its package)

Rows are ``method:sparsity`` (structured, e.g. ``flap:0.3``, ``disp_llm:0.3``, ``sleb:0.2``, ``shortgpt:0.2``) or
``method:N:M`` (``sparsegpt:2:4``, ``fista:2:4``). Pruning calibration: 32 windows x 256 tokens, seed 0, from
``calibration.txt`` (the WikiText-2 validation split); training text: the same file (not the test split); evaluation:
the first ``--eval-windows`` 256-token windows of ``wikitext2-test.txt``. Assets come from ``$HF_SPARSE_SHARED``
(default ``<repo>/../shared``). ``--json`` appends one line per finished row, so a long run loses nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from hf_sparse.cli.common import add_threads_argument, apply_threads
from hf_sparse.evaluation import perplexity
from hf_sparse.recovery import RecoveryConfig, recover
from hf_sparse.saving import save_checkpoint

from benchmark_pruning import resolve_model  # examples/ is on sys.path when a script in it runs

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
DEFAULT_ROWS = "flap:0.3,disp_llm:0.3,sleb:0.2,sparsegpt:2:4,fista:2:4"
CORRECTED = "-corrected"
#: --objectives: recover()'s objectives, and distillation from the corrected teacher (the control)
OBJECTIVE_LABELS = {"lm": "+ LM recovery", "distill": "+ distillation", "distill+lm": "+ distillation + LM",
                    "distill" + CORRECTED: "+ distillation, corrected teacher",
                    "distill+lm" + CORRECTED: "+ distillation + LM, corrected teacher"}


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Largest resident set size while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def parse_row(text: str) -> tuple[str, hf_sparse.SparsityConfig | dict]:
    method, _, rest = text.partition(":")
    if ":" in rest:
        return method, {"method": method, "pattern": rest}
    return method, {"method": method, "pattern": "structured", "sparsity": float(rest)}


def time_steps(args, pruned_student, train, dense_model) -> None:
    """CPU time per step of LM recovery and distillation, measured in alternation in this process (so that load
    from other jobs on the machine falls on both alike); the median of each and their ratio. The distillation
    objective is the first of --objectives that is not 'lm' (its teacher: the dense model; a corrected teacher has
    the same shapes and costs the same)."""
    objective = next((o.removesuffix(CORRECTED) for o in args.objectives.split(",") if o != "lm"), "distill+lm")
    print(f"| student | train | CPU s/step LM | CPU s/step {objective} | ratio | ({args.timing} alternating runs of "
          f"{args.steps} steps x {args.batch_size} x {args.sequence_length} tokens each) |")
    print("|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        method, options = parse_row(row)
        pruned_model, _ = pruned_student(row)
        for training in args.train.split(","):
            if args.full_rows and training == "full" and method not in args.full_rows.split(","):
                continue
            per_step: dict[str, list[float]] = {"lm": [], objective: []}
            for _ in range(args.timing):
                for name in per_step:
                    result, _ = train(copy.deepcopy(pruned_model), name, training, dense_model,
                                      heldout_fraction=0.0)
                    per_step[name].append(result.cpu_seconds / args.steps)
            lm, kd = statistics.median(per_step["lm"]), statistics.median(per_step[objective])
            print(f"| {method} {options.get('sparsity', options['pattern'])} | {training} | {lm:.3f} | {kd:.3f} | "
                  f"{kd / lm:.2f} | |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7m-books",
                        help="'llama-7m-books' (../shared), 'smollm2' (the test-bed) or a folder "
                             "(default: %(default)s)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated students (default: %(default)s)")
    parser.add_argument("--train", default="lora", help="comma-separated: lora, full (default: %(default)s)")
    parser.add_argument("--full-rows", default=None,
                        help="with --train lora,full: only these rows (comma-separated methods) also get full FT")
    parser.add_argument("--objectives", default="lm,distill+lm,distill+lm-corrected",
                        help="comma-separated: lm, distill, distill+lm, and distill-corrected / distill+lm-corrected "
                             "(distillation from the corrected teacher = the dense model given the same training) "
                             "(default: %(default)s)")
    parser.add_argument("--no-control", action="store_true", help="skip 'dense + same training'")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--sequence-length", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--lr-lora", type=float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--lr-full", type=float, default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=RecoveryConfig.temperature,
                        help="(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="(default: the whole vocabulary)")
    parser.add_argument("--hidden-weight", type=float, default=RecoveryConfig.hidden_weight,
                        help="(default: %(default)s)")
    parser.add_argument("--disp-steps", type=int, default=None, help="DISP-LLM hypernetwork steps (default: its own)")
    parser.add_argument("--eval-windows", type=int, default=200,
                        help="test windows of 256 tokens (default: %(default)s)")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="seed of the training runs: data order and adapter init (default: %(default)s; pruning "
                             "always uses seed 0)")
    parser.add_argument("--json", default=None, help="append one JSON line per finished row to this file")
    parser.add_argument("--pruned-cache", default=None, metavar="DIR",
                        help="save each pruned student here and reuse it on the next run (pruning DISP-LLM or FISTA "
                             "SmolLM2 takes many minutes)")
    parser.add_argument("--timing", type=int, default=0, metavar="REPEATS",
                        help="only time the steps: per row and training, REPEATS alternating short runs (LM, "
                             "distillation, LM, ...) of --steps steps each; prints CPU s/step and the ratio")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    logging.basicConfig(level=logging.WARNING)

    model_dir, model_name = resolve_model(args.model, parser)
    calibration = str(SHARED / "data" / "calibration.txt")
    test_text = (SHARED / "data" / "wikitext2-test.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ppl(model) -> float:
        return perplexity(model, tokenizer, test_text, sequence_length=256, max_windows=args.eval_windows,
                          show_progress=False)

    def train(model, objective: str, method: str, teacher, **extra):
        options = dict(objective=objective, method=method, steps=args.steps, batch_size=args.batch_size,
                       sequence_length=args.sequence_length, rank=args.rank, seed=args.train_seed,
                       learning_rate=args.lr_lora if method == "lora" else args.lr_full,
                       temperature=args.temperature, top_k=args.top_k, hidden_weight=args.hidden_weight,
                       logging_steps=max(1, args.steps // 5))
        with PeakMemory() as memory:
            result = recover(model, tokenizer, calibration, teacher_model=teacher if objective != "lm" else None,
                             show_progress=False, **options, **extra)
        return result, memory.peak

    def pruned_student(row: str):
        """The pruned student of ``row`` and the seconds it took (from --pruned-cache when it is there)."""
        method, options = parse_row(row)
        method_options = {"steps": args.disp_steps} if method == "disp_llm" and args.disp_steps else {}
        start = time.perf_counter()
        config = hf_sparse.SparsityConfig(**options, calibration=calibration, num_samples=32, sequence_length=256,
                                          seed=0, method_options=method_options)
        name = f"{model_name}-{row.replace(':', '-')}" + (f"-steps{args.disp_steps}" if method_options else "")
        cached = Path(args.pruned_cache) / name if args.pruned_cache else None
        if cached is not None and (cached / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)  # reloads bit for bit
        else:
            model = load()
            hf_sparse.prune(model, config, tokenizer=tokenizer, show_progress=False)
            if cached is not None:
                save_checkpoint(model, tokenizer, cached)
        return model, time.perf_counter() - start

    dense_model = load()
    if args.timing:
        time_steps(args, pruned_student, train, dense_model)
        return
    dense = ppl(dense_model)
    trainings = args.train.split(",")
    objectives = args.objectives.split(",")
    unknown = sorted(set(objectives) - set(OBJECTIVE_LABELS))
    if unknown:
        parser.error(f"--objectives {','.join(unknown)}: allowed {', '.join(OBJECTIVE_LABELS)}")
    if args.no_control and any(o.endswith(CORRECTED) for o in objectives):
        parser.error("a '-corrected' objective distils from the control (the dense model given the same training): "
                     "drop --no-control")
    distilled = [o for o in objectives if o != "lm"]
    controls: dict[str, tuple[float, torch.nn.Module, float]] = {}
    print(f"{model_name}: {args.steps} steps x {args.batch_size} x {args.sequence_length} tokens per run "
          f"({args.steps * args.batch_size * args.sequence_length} tokens), perplexity on the first "
          f"{args.eval_windows} 256-token windows of wikitext2-test.txt; dense {dense:.2f}", flush=True)
    header = ("| student | train | pruned | " + " | ".join(OBJECTIVE_LABELS[o] for o in objectives) +
              " | dense + same training | dense | " +
              " | ".join(f"gap closed ({OBJECTIVE_LABELS[o]})" for o in distilled) +
              " | " + " | ".join(f"CPU s/step {OBJECTIVE_LABELS[o]}" for o in objectives) +
              ("".join(f" | step ratio ({OBJECTIVE_LABELS[o]} / LM)" for o in distilled) if "lm" in objectives
               else "") +
              " | " + " | ".join(f"peak RSS {OBJECTIVE_LABELS[o]}" for o in objectives) + " |")
    print(header, flush=True)
    print("|" + "---|" * (header.count("|") - 1), flush=True)

    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    for row in args.rows.split(","):
        method, options = parse_row(row)
        pruned_model, prune_seconds = pruned_student(row)
        pruned = ppl(pruned_model)
        for training in trainings:
            if args.full_rows and training == "full" and method not in args.full_rows.split(","):
                continue
            if not args.no_control and training not in controls:
                # The dense model given the students' training (LM loss, same tokens and steps): the adaptation
                # control, and also the corrected teacher (recover(teacher_correction_steps=steps) trains exactly
                # this model), so it is computed once and shared by every student.
                control, _ = train(copy.deepcopy(dense_model), "lm", training, None, dense_control=True)
                control.model.requires_grad_(False)
                controls[training] = (ppl(control.model), control.model, control.cpu_seconds)
                print(f"dense + same training ({training}): {controls[training][0]:.2f}, "
                      f"{control.cpu_seconds:.0f} s of CPU (the teacher correction's one-time cost)", flush=True)
            results, seconds, peaks = {}, {}, {}
            for objective in objectives:
                student = copy.deepcopy(pruned_model)
                corrected = objective.endswith(CORRECTED)
                teacher = controls[training][1] if corrected else dense_model
                result, peak = train(student, objective.removesuffix(CORRECTED), training, teacher)
                results[objective] = ppl(result.model)
                # CPU time of this process (one thread): other jobs on the machine do not inflate it
                seconds[objective] = result.cpu_seconds / args.steps
                peaks[objective] = peak
                del student, result
            control_ppl = controls[training][0] if training in controls else None
            closed = {o: (pruned - results[o]) / (pruned - dense) if pruned > dense else None for o in distilled}
            ratios = {o: seconds[o] / seconds["lm"] for o in distilled} if "lm" in seconds else {}
            label = f"{method} {options.get('sparsity', options['pattern'])}"
            print(f"| {label} | {training} | {pruned:.2f} | " + " | ".join(fmt(results[o]) for o in objectives) +
                  f" | {fmt(control_ppl)} | {dense:.2f} | " + " | ".join(fmt(closed[o], ".0%") for o in distilled) +
                  " | " + " | ".join(fmt(seconds[o], ".3f") for o in objectives) +
                  "".join(f" | {fmt(ratios[o])}" for o in ratios) +
                  " | " + " | ".join(f"{peaks[o] / 2**20:.0f} MiB" for o in objectives) + " |", flush=True)
            if args.json:
                line = {"model": model_name, "row": row, "train": training, "pruned": pruned, "results": results,
                        "control": control_ppl, "dense": dense, "gap_closed": closed,
                        "seconds_per_step": seconds, "peak_rss": peaks, "prune_seconds": prune_seconds,
                        "steps": args.steps, "batch_size": args.batch_size, "sequence_length": args.sequence_length,
                        "temperature": args.temperature, "top_k": args.top_k, "hidden_weight": args.hidden_weight,
                        "disp_steps": args.disp_steps, "train_seed": args.train_seed}
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")
        del pruned_model

if __name__ == "__main__":
    main()
