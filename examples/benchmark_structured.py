"""Benchmark structured pruning (FLAP, ShortGPT, SLEB, PIP, DISP-LLM): quality, speed against the ideal, checkpoint size, memory.

Part 1, per method x sparsity (fraction of decoder-block parameters removed), each in a fresh subprocess (so its peak
RSS is its own): prune with ``from_pretrained(..., sparsity_config=...)`` (32 windows of 256 tokens, seed 0, from
``calibration.txt``), perplexity over the first ``--eval-windows`` non-overlapping 256-token windows of
``wikitext2-test.txt``, the achieved fraction, wall seconds, peak RSS, and the saved checkpoint's bytes.

Part 2, side by side in one process: CPU prefill tokens/s (one ``--prompt-tokens`` prompt) and decode tokens/s
(``--decode-tokens`` greedy tokens with the KV cache) of the dense model and of each ``--speed-sparsity`` model, in
interleaved rounds (median), next to the ideal speed-up = dense FLOPs / pruned FLOPs (every linear of the blocks,
``lm_head`` and the attention products; the embedding lookup costs no FLOPs). When a DISP-LLM model is among them, the
dense model with *identity* residual selections at every point (same FLOPs, plus the ``index_select`` / ``index_add``
hooks) is timed too: the run-time cost of the selections alone.

Part 3 (``--memory-depths``): peak RSS minus weight bytes while FLAP prunes random Llamas of one width and growing
depth: flat when only one block's activations are alive.

SLEB's greedy search costs (blocks removed) x (candidates) calibration forwards: ``--sleb-prefix`` runs it once at the
largest sparsity and takes its first removals for the smaller ones (exactly what those runs would choose), and
``--sleb-num-samples`` gives SLEB alone fewer calibration windows. A list of option sets per method
(``--method-options '{"pip": [{"rounds": 1}, {"rounds": 4}]}'``) gives one row each against one dense baseline.
``--speed-from FOLDER`` times the checkpoints an earlier run saved (part 2 alone, e.g. under ``cpu-run --threads 2``);
``--memory-only`` with ``--memory-widths-of MODEL`` runs part 3 at a real model's widths. ``--sparsity-profiles``
compares how the share is spread over the blocks (methods that take per-block targets: flap, pip, disp_llm):
``uniform`` (the default: one global budget, the method decides each block's share), ``per-block`` (every block
loses the same share of its own parameters: FLAP's UL-UM), ``owl`` (OWL's outlier-weighted shares, options from
``--profile-options``) or a JSON file (an explicit profile).

    python examples/benchmark_structured.py                                  # the 7M model, everything
    python examples/benchmark_structured.py --model ~/.cache/hf_sparse/testbed/smollm2-135m-instruct --eval-windows 64 \
        --methods flap,shortgpt --no-speed --output /tmp/smol
    python examples/benchmark_structured.py --methods disp_llm,flap                    # DISP-LLM against FLAP
    python examples/benchmark_structured.py --methods flap --sparsities 0.2,0.3 --no-speed \
        --sparsity-profiles uniform,per-block,owl                                    # global vs per-block vs OWL
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_sparse.cli.common import add_threads_argument, apply_threads

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
RESULT_PREFIX = "BENCHMARK-RESULT "
MB = 1024 * 1024


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak if sys.platform == "darwin" else peak * 1024


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Workers (one subprocess each)


def worker(job: dict) -> dict:
    import torch
    import transformers

    import hf_sparse

    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model"])
    start = time.perf_counter()
    if job["method"] == "dense":
        model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        fraction = 0.0
    else:
        cfg = hf_sparse.SparsityConfig(method=job["method"], pattern="structured", sparsity=job["sparsity"],
                                       calibration=job["calibration"], num_samples=job["num_samples"],
                                       sequence_length=job["sequence_length"], seed=0, tokenizer=tokenizer,
                                       method_options=job.get("options") or {},
                                       sparsity_profile=sparsity_profile(job),
                                       profile_options=job.get("profile_options") or {})
        model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32,
                                                                  sparsity_config=cfg)
        fraction = hf_sparse.read_record(model).overall_sparsity
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    text = Path(job["eval"]).read_text()
    ppl = hf_sparse.evaluation.perplexity(model, tokenizer, text, sequence_length=256, max_windows=job["windows"],
                                          show_progress=False)
    out = Path(job["output"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    profile = hf_sparse.read_record(model).sparsity_profile if job["method"] != "dense" else None
    return {"method": job["method"], "sparsity": job["sparsity"], "achieved": fraction, "perplexity": ppl,
            "seconds": seconds, "peak_rss": peak, "bytes": checkpoint_bytes(out), "output": str(out),
            "block_achieved": (profile or {}).get("block_achieved")}


def sparsity_profile(job: dict):
    """The job's ``sparsity_profile``: ``per-block`` is every block at the job's sparsity (an explicit profile)."""
    profile = job.get("profile") or "uniform"
    if profile == "per-block":
        import transformers

        blocks = transformers.AutoConfig.from_pretrained(job["model"]).num_hidden_layers
        return {str(index): job["sparsity"] for index in range(blocks)}
    if profile.endswith(".json"):
        return json.loads(Path(profile).read_text())
    return profile


def sleb_prefix_worker(job: dict) -> dict:
    """SLEB once at the largest sparsity; the smaller ones are the first blocks it removed. Greedy removal makes this
    exact: a SLEB run to fewer blocks takes the same steps on the same calibration data and stops earlier."""
    import logging

    import torch
    import transformers

    import hf_sparse
    from hf_sparse.api import _prune_structured
    from hf_sparse.methods.sleb import SLEBPruning
    from hf_sparse.methods.structured import blocks_for_fraction
    from hf_sparse.surgery import StructuredEdits

    order: list[int] = []

    class Capture(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("sleb: removing block "):
                order.append(int(record.args[0]))

    logging.getLogger("hf_sparse.methods.sleb").setLevel(logging.INFO)
    logging.getLogger("hf_sparse.methods.sleb").addHandler(Capture())
    largest = worker(job)
    results = [largest]
    for sparsity in job["prefix_sparsities"]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["model"])
        model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
        count = blocks_for_fraction(model.config.num_hidden_layers, sparsity)

        class Prefix(SLEBPruning):
            def plan_edits(self, session, _sparsity):
                return StructuredEdits(removed_blocks=tuple(order[:count]))

        cfg = hf_sparse.SparsityConfig(method="sleb", pattern="structured", sparsity=sparsity,
                                       calibration=job["calibration"], num_samples=job["num_samples"],
                                       sequence_length=job["sequence_length"], seed=0, tokenizer=tokenizer)
        ids = hf_sparse.calibration.load_calibration(job["calibration"], tokenizer, job["num_samples"],
                                                     job["sequence_length"], 0)
        start = time.perf_counter()
        _prune_structured(model, cfg, Prefix(), ids, None, show_progress=False)
        seconds = time.perf_counter() - start
        text = Path(job["eval"]).read_text()
        ppl = hf_sparse.evaluation.perplexity(model, tokenizer, text, sequence_length=256, max_windows=job["windows"],
                                              show_progress=False)
        out = Path(job["output"]).with_name(f"sleb-{int(round(sparsity * 100))}")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        results.append({"method": "sleb", "sparsity": sparsity, "achieved": hf_sparse.read_record(model).overall_sparsity,
                        "perplexity": ppl, "seconds": seconds, "peak_rss": peak_rss_bytes(),
                        "bytes": checkpoint_bytes(out), "output": str(out), "order": order[:count]})
    largest["order"] = order
    return {"results": results}


def memory_worker(job: dict) -> dict:
    import torch
    import transformers

    import hf_sparse

    if job.get("config"):  # a real model's widths (e.g. SmolLM2), random weights, the requested depth
        config = transformers.AutoConfig.from_pretrained(job["config"])
        config.num_hidden_layers = job["depth"]
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:1] * job["depth"]
    else:
        config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768,
                                          num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=job["depth"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (16, 256), generator=torch.Generator().manual_seed(0))
    before = peak_rss_bytes()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3,
                                                    calibration=ids, num_samples=16, sequence_length=256),
                    show_progress=False)
    return {"depth": job["depth"], "weights": weights, "peak_rss": peak_rss_bytes(), "before": before}


def run_worker(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker {job} failed:\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------------------------------
# Speed


def flops(model, tokens: int, context: int) -> float:
    """FLOPs of ``tokens`` new tokens each attending to ``context`` earlier positions on average: 2 per weight of
    every block linear and lm_head per token, plus QKᵀ and AV (2·2·context·heads·head_dim per token and block)."""
    from torch import nn

    from hf_sparse.architectures import get_architecture
    from hf_sparse.surgery import block_shape

    adapter = get_architecture(model)
    linear = sum(m.weight.numel() for m in adapter.blocks(model).modules() if isinstance(m, nn.Linear))
    linear += model.get_output_embeddings().weight.numel()
    attention = sum(4 * context * s.attention_heads * s.head_dim
                    for s in (block_shape(adapter, b) for b in adapter.blocks(model)))
    return tokens * (2 * linear + attention)


def identity_selections(dense):
    """A copy of ``dense`` whose blocks read and write all residual dimensions through the DISP-LLM selection hooks."""
    import copy

    from hf_sparse.architectures import get_architecture
    from hf_sparse.surgery import RESIDUAL_POINTS, BlockEdit, ResidualEdit, StructuredEdits, apply_edits

    model = copy.deepcopy(dense)
    adapter = get_architecture(model)
    everything = tuple(range(model.config.hidden_size))
    edit = BlockEdit(residual=ResidualEdit(**{point: everything for point in RESIDUAL_POINTS}))
    apply_edits(model, adapter, StructuredEdits(blocks={i: edit for i in range(len(adapter.blocks(model)))}))
    return model


def speed_table(models: dict, prompt_tokens: int, decode_tokens: int, rounds: int) -> list[dict]:
    import torch

    torch.manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens))
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(prompt[:, :32])
        for _ in range(rounds):
            for name, model in models.items():  # interleaved: every model sees the same machine load
                start = time.perf_counter()
                model(prompt, use_cache=False)
                prefill[name].append(prompt_tokens / (time.perf_counter() - start))
                short = prompt[:, :64]
                start = time.perf_counter()
                model.generate(short, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                               use_cache=True, pad_token_id=0)
                decode[name].append(decode_tokens / (time.perf_counter() - start))
    dense = models["dense"]
    rows = []
    for name, model in models.items():
        ideal_prefill = flops(dense, prompt_tokens, prompt_tokens) / flops(model, prompt_tokens, prompt_tokens)
        mid = 64 + decode_tokens // 2
        ideal_decode = flops(dense, 1, mid) / flops(model, 1, mid)
        p = statistics.median(prefill[name]) / statistics.median(prefill["dense"])
        d = statistics.median(decode[name]) / statistics.median(decode["dense"])
        rows.append({"model": name, "prefill_tok_s": statistics.median(prefill[name]),
                     "decode_tok_s": statistics.median(decode[name]), "prefill_speedup": p,
                     "ideal_prefill": ideal_prefill, "decode_speedup": d, "ideal_decode": ideal_decode})
    return rows


def saved_models(folder: Path, methods: list[str], sparsity: float) -> dict:
    """The dense checkpoint and each method's checkpoint at ``sparsity`` from an earlier run's ``--output`` folder."""
    import transformers

    import hf_sparse

    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(folder / "dense").eval()}
    for method in methods:
        path = folder / f"{method}-{int(round(sparsity * 100))}"
        if path.is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            models[f"{method} {hf_sparse.read_record(model).overall_sparsity:.3f}"] = model
    return models


def print_speed(models: dict, args) -> None:
    import torch

    if not models:
        return
    if any(name.startswith("disp_llm") for name in models):  # the selection hooks' own cost, at full width
        models = {**models, "dense, identity selections": identity_selections(models["dense"])}
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = speed_table(models, args.prompt_tokens, args.decode_tokens, args.rounds)
    print(f"\nspeed, CPU float32, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds: "
          f"prefill of a {args.prompt_tokens}-token prompt, decode of {args.decode_tokens} tokens with the KV cache; "
          f"load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| model | prefill tok/s | speed-up | ideal | of ideal | decode tok/s | speed-up | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['prefill_tok_s']:.0f} | {row['prefill_speedup']:.2f} | "
              f"{row['ideal_prefill']:.2f} | {row['prefill_speedup'] / row['ideal_prefill']:.2f} | "
              f"{row['decode_tok_s']:.1f} | {row['decode_speedup']:.2f} | {row['ideal_decode']:.2f} | "
              f"{row['decode_speedup'] / row['ideal_decode']:.2f} |", flush=True)


def print_memory(args) -> None:
    if not args.memory_depths:
        return
    widths = f"widths of {args.memory_widths_of}" if args.memory_widths_of else "hidden 256"
    print(f"\npeak RSS while FLAP prunes random Llamas ({widths}, 16 x 256 calibration tokens)")
    print("| blocks | weights MB | peak RSS MB | peak minus weights MB |")
    print("|---|---|---|---|")
    for depth in (int(d) for d in args.memory_depths.split(",")):
        r = run_worker({"kind": "memory", "depth": depth, "config": args.memory_widths_of})
        print(f"| {depth} | {r['weights'] / MB:.1f} | {r['peak_rss'] / MB:.0f} | "
              f"{(r['peak_rss'] - r['weights']) / MB:.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=str(SHARED / "models" / "llama-7m-books"))
    parser.add_argument("--methods", default="flap,shortgpt,sleb")
    parser.add_argument("--sparsities", default="0.2,0.3,0.5")
    parser.add_argument("--eval-windows", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--speed-sparsity", type=float, default=0.3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-speed", action="store_true", help="skip part 2")
    parser.add_argument("--memory-depths", default="", help="e.g. 6,12,24 (random Llamas pruned by FLAP)")
    parser.add_argument("--memory-only", action="store_true", help="part 3 alone")
    parser.add_argument("--memory-widths-of", default=None,
                        help="part 3 with this model folder's widths (random weights) instead of hidden 256")
    parser.add_argument("--method-options", default="{}",
                        help='JSON: options per method, e.g. \'{"pip": {"rounds": 1, "strength": 0.3}}\'; a list of '
                             'option sets gives one row each (ablations), e.g. \'{"pip": [{"rounds": 1}, {"rounds": 2}]}\'')
    parser.add_argument("--speed-from", default=None,
                        help="skip part 1: time the checkpoints an earlier run saved in this --output folder (dense and "
                             "each of --methods at --speed-sparsity)")
    parser.add_argument("--sleb-prefix", action="store_true",
                        help="run SLEB once at the largest sparsity and take its first removals for the smaller ones "
                             "(exact for a greedy search; the prune seconds of those rows are the surgery only)")
    parser.add_argument("--sleb-num-samples", type=int, default=None,
                        help="calibration windows for SLEB only (its cost grows with blocks² × calibration tokens)")
    parser.add_argument("--sparsity-profiles", default="uniform",
                        help="comma-separated: uniform (global budget), per-block (the same share of every block), "
                             "owl, or a JSON file (explicit profile); one row each")
    parser.add_argument("--profile-options", default="{}", help='JSON options of the owl profile, e.g. '
                                                                '\'{"m": 5, "lambda": 0.08}\'')
    parser.add_argument("--output", default=None, help="folder for the pruned checkpoints (default: a temp dir)")
    add_threads_argument(parser)
    args = parser.parse_args()
    # The workers are subprocesses: they read the count from the environment (hf_sparse.threads), so every part of
    # the run, pruning and timing alike, uses the same number of threads.
    os.environ["HF_SPARSE_NUM_THREADS"] = str(apply_threads(args))
    if args.worker:
        job = json.loads(args.worker)
        kind = job.get("kind")
        result = (memory_worker(job) if kind == "memory" else sleb_prefix_worker(job) if kind == "sleb_prefix"
                  else worker(job))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    if args.memory_only:
        print_memory(args)
        return
    if args.speed_from:
        print_speed(saved_models(Path(args.speed_from), args.methods.split(","), args.speed_sparsity), args)
        return
    out_root = Path(args.output or tempfile.mkdtemp(prefix="structured-bench-"))
    common = {"model": args.model, "calibration": str(SHARED / "data" / "calibration.txt"),
              "eval": str(SHARED / "data" / "wikitext2-test.txt"), "windows": args.eval_windows,
              "num_samples": args.num_samples, "sequence_length": args.sequence_length}
    results = [run_worker({**common, "method": "dense", "sparsity": 0.0, "output": str(out_root / "dense")})]
    dense = results[0]
    print(f"model {args.model}: dense perplexity {dense['perplexity']:.2f} ({args.eval_windows} windows of 256), "
          f"checkpoint {dense['bytes'] / MB:.1f} MB, load peak RSS {dense['peak_rss'] / MB:.0f} MB", flush=True)
    print("\n| method | target | removed (exact) | perplexity | x dense | prune s | peak RSS MB | checkpoint vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    method_options = json.loads(args.method_options)
    profiles = args.sparsity_profiles.split(",")
    block_lines: list[str] = []
    for method, profile in ((m, p) for m in args.methods.split(",") for p in profiles):
        option_sets = method_options.get(method, {})
        for number, options in enumerate(option_sets if isinstance(option_sets, list) else [option_sets]):
            label = method + "".join(f" {k}={v}" for k, v in sorted(options.items())) + (
                f" [{Path(profile).stem if profile.endswith('.json') else profile}]" if profile != "uniform" else "")
            sparsities = [float(s) for s in args.sparsities.split(",")]
            job = {**common, "method": method, "options": options, "profile": profile,
                   "profile_options": json.loads(args.profile_options) if profile == "owl" else {}}
            if method == "sleb" and args.sleb_num_samples:
                job["num_samples"] = args.sleb_num_samples
            rows = []
            if method == "sleb" and args.sleb_prefix:
                largest = max(sparsities)
                rows = run_worker({**job, "kind": "sleb_prefix", "sparsity": largest,
                                   "prefix_sparsities": [s for s in sparsities if s != largest],
                                   "output": str(out_root / f"sleb-{int(round(largest * 100))}")})["results"]
                print(f"sleb removal order ({job['num_samples']} x {args.sequence_length} calibration): "
                      f"{rows[0]['order']}", flush=True)
                rows.sort(key=lambda r: r["sparsity"])
            else:
                for sparsity in sparsities:
                    folder = f"{method}-{int(round(sparsity * 100))}" + (f"-{number}" if number else "") + (
                        f"-{Path(profile).stem}" if profile != "uniform" else "")
                    rows.append(run_worker({**job, "sparsity": sparsity, "output": str(out_root / folder)}))
            for r in rows:
                sparsity = r["sparsity"]
                results.append(r)
                print(f"| {label} | {sparsity:.0%} | {r['achieved']:.4f} | {r['perplexity']:.2f} | "
                      f"{r['perplexity'] / dense['perplexity']:.2f} | {r['seconds']:.0f} | {r['peak_rss'] / MB:.0f} | "
                      f"{r['bytes'] / dense['bytes']:.3f} |", flush=True)
                r["label"] = label
                if r.get("block_achieved"):
                    block_lines.append(f"{label} {sparsity:.0%}: removed per block "
                                       + " ".join(f"{v:.3f}" for v in r["block_achieved"].values()))
    for line in block_lines:  # after the table, so it stays one table
        print(line, flush=True)

    import transformers

    import hf_sparse  # noqa: F401  (loads the non-uniform FLAP checkpoints)

    if args.no_speed:
        models = {}
    else:
        models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(dense["output"]).eval()}
    for r in results[1:] if models else ():
        if abs(r["sparsity"] - args.speed_sparsity) < 1e-9:
            models[f"{r.get('label', r['method'])} {r['achieved']:.3f}"] = \
                transformers.AutoModelForCausalLM.from_pretrained(r["output"]).eval()
    print_speed(models, args)

    print_memory(args)

if __name__ == "__main__":
    main()
