"""Benchmark the pruning methods on the project's pretrained model: quality, wall time and peak memory.

Part 1, for every method x pattern on ``../shared/models/llama-7m-books`` (``HF_SPARSE_SHARED`` overrides ``../shared``):
wall seconds of ``hf_sparse.prune`` (calibration included), peak RSS, and dense/pruned perplexity. Calibration is 32
windows of 256 tokens drawn with seed 0 from ``calibration.txt``; perplexity is over every non-overlapping 256-token
window of ``wikitext2-test.txt`` (``--max-windows`` shortens it) -- the settings of the reference table in
``../shared/ASSETS.md``.

Part 2 shows that pruning memory does not grow with depth beyond the model's own weights: random Llamas of the same
width with 6, 12 and 24 blocks are pruned with SparseGPT, and peak RSS minus the weight bytes stays flat, because the
engine keeps only one block's activations and statistics alive.

Every run is a fresh subprocess, so each peak RSS belongs to that run alone.

    python examples/benchmark_pruning.py                          # everything (~1 h on 2 busy CPU cores)
    python examples/benchmark_pruning.py --max-windows 200 --methods wanda,sparsegpt --patterns 2:4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
RESULT_PREFIX = "BENCHMARK-RESULT "
MB = 1024 * 1024


def peak_rss_bytes() -> int:
    # ru_maxrss is the high-water mark of this process, in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best available stand-in
        return peak_rss_bytes()


def parse_pattern(text: str) -> tuple[str, float | None]:
    """``"50%"`` -> unstructured at 0.5, ``"2:4"`` -> that N:M pattern."""
    if text.endswith("%"):
        return "unstructured", float(text[:-1]) / 100
    if ":" in text:
        return text, None
    raise ValueError(f"pattern {text!r} is not allowed: use a percentage for unstructured ('50%') or N:M ('2:4')")


# ----------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON result line.


def worker_pretrained(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparse

    # Optional job keys (other benchmarks reuse this worker): model_dir, heldout, calibration, sparsity_profile,
    # profile_options.
    model_dir = Path(job.get("model_dir") or Path(job["shared"]) / "models" / "llama-7m-books")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout_path = job.get("heldout") or Path(job["shared"]) / "data" / "wikitext2-test.txt"
    heldout = Path(heldout_path).read_text(encoding="utf-8")
    result: dict = {"rss_loaded": current_rss_bytes()}
    if job["method"] == "dense":
        result["seconds"] = 0.0
        result["peak_rss"] = peak_rss_bytes()
        result["sparsity"] = 0.0
    else:
        config = hf_sparse.SparsityConfig(
            method=job["method"], pattern=job["pattern"], sparsity=job["sparsity"],
            calibration=job.get("calibration") or str(Path(job["shared"]) / "data" / "calibration.txt"),
            num_samples=job["num_samples"], sequence_length=job["sequence_length"], seed=job["seed"], batch_size=8,
            sparsity_profile=job.get("sparsity_profile", "uniform"), profile_options=job.get("profile_options", {}),
        )
        start = time.perf_counter()
        record = hf_sparse.prune(model, config, tokenizer=tokenizer, show_progress=False)
        result["seconds"] = time.perf_counter() - start
        # Read before the evaluation so the number is the pruning step's peak (model load included).
        result["peak_rss"] = peak_rss_bytes()
        result["sparsity"] = record.overall_sparsity
        result["block_sparsity"] = (record.sparsity_profile or {}).get("block_sparsity")
    result["perplexity"] = hf_sparse.evaluate.perplexity(
        model, tokenizer, heldout, sequence_length=job["eval_sequence_length"], max_windows=job["max_windows"],
        show_progress=False,
    )
    return result


def worker_depth(job: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparse

    torch.manual_seed(0)
    # Same width as llama-7m-books; only the number of decoder blocks changes.
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024, num_hidden_layers=job["blocks"],
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calibration = torch.randint(0, 4096, (job["num_samples"], job["sequence_length"]),
                                generator=torch.Generator().manual_seed(0))
    rss_loaded = current_rss_bytes()
    start = time.perf_counter()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="sparsegpt", pattern="2:4", calibration=calibration,
                                                    num_samples=job["num_samples"],
                                                    sequence_length=job["sequence_length"], batch_size=8),
                    show_progress=False)
    seconds = time.perf_counter() - start
    return {"weight_bytes": weight_bytes, "rss_loaded": rss_loaded, "peak_rss": peak_rss_bytes(), "seconds": seconds}


def run_worker(job: dict) -> dict:
    """Run ``job`` in a fresh Python process and return its result."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                               text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"benchmark worker for {job} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


# ----------------------------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                        help="comma-separated registered methods (default: %(default)s)")
    parser.add_argument("--patterns", default="50%,2:4,70%",
                        help="comma-separated: a percentage for unstructured, or N:M (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate on the first N 256-token windows only (default: all 1458)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depths", default="6,12,24", help="block counts for the memory-scaling part ('' skips it)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (each still its own process; >1 makes wall times noisier)")
    parser.add_argument("--skip-quality", action="store_true", help="only the memory-scaling part")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        result = worker_depth(job) if job["kind"] == "depth" else worker_pretrained(job)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    import hf_sparse

    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in hf_sparse.METHODS:
            parser.error(f"--methods: {method!r} is not registered; registered: {sorted(hf_sparse.METHODS)}")
    try:
        patterns = [(text, *parse_pattern(text)) for text in args.patterns.split(",") if text]
    except ValueError as error:
        parser.error(str(error))
    common = dict(kind="pretrained", shared=str(SHARED), num_samples=args.num_samples,
                  sequence_length=args.sequence_length, seed=args.seed, eval_sequence_length=256,
                  max_windows=args.max_windows)
    results: dict = {"settings": {k: v for k, v in common.items() if k != "kind"}, "quality": [], "depth": []}
    started = time.perf_counter()

    if not args.skip_quality:
        if not (SHARED / "models" / "llama-7m-books").exists():
            parser.error(f"the pretrained model is not at {SHARED / 'models' / 'llama-7m-books'}: set HF_SPARSE_SHARED")
        jobs = [dict(common, method="dense", pattern="unstructured", sparsity=None)]
        jobs += [dict(common, method=m, pattern=p, sparsity=s, label=label) for m in methods for label, p, s in patterns]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outputs = list(pool.map(run_worker, jobs))
        dense = outputs[0]
        windows = "all" if args.max_windows is None else f"first {args.max_windows}"
        print(f"\nPruning llama-7m-books ({SHARED}); calibration {args.num_samples} x {args.sequence_length} tokens, "
              f"seed {args.seed}; perplexity on {windows} non-overlapping 256-token windows of wikitext2-test.txt")
        print(f"dense perplexity {dense['perplexity']:.2f}; loading the model + evaluating: peak RSS "
              f"{dense['peak_rss'] / MB:.0f} MB\n")
        rows = []
        for job, out in zip(jobs[1:], outputs[1:]):
            results["quality"].append({**job, **out, "dense_perplexity": dense["perplexity"]})
            rows.append([job["method"], job["label"], f"{dense['perplexity']:.2f}", f"{out['perplexity']:.2f}",
                         f"{out['sparsity']:.4f}", f"{out['seconds']:.1f}", f"{out['peak_rss'] / MB:.0f}",
                         f"{(out['peak_rss'] - out['rss_loaded']) / MB:.0f}"])
        print(table(["method", "pattern", "dense ppl", "pruned ppl", "sparsity", "prune s", "peak RSS MB",
                     "peak - loaded MB"], rows))

    depths = [int(d) for d in args.depths.split(",") if d]
    if depths:
        jobs = [dict(kind="depth", blocks=d, num_samples=args.num_samples, sequence_length=args.sequence_length)
                for d in depths]
        outputs = [run_worker(job) for job in jobs]  # one at a time: this part is about memory
        print(f"\nSparseGPT 2:4 on random Llamas of llama-7m-books' width (hidden 256, MLP 768), calibration "
              f"{args.num_samples} x {args.sequence_length} random tokens:\n")
        rows = []
        for job, out in zip(jobs, outputs):
            results["depth"].append({**job, **out})
            rows.append([str(job["blocks"]), f"{out['weight_bytes'] / MB:.1f}", f"{out['rss_loaded'] / MB:.0f}",
                         f"{out['peak_rss'] / MB:.0f}", f"{(out['peak_rss'] - out['weight_bytes']) / MB:.0f}",
                         f"{out['seconds']:.1f}"])
        print(table(["blocks", "weights MB", "RSS after build MB", "peak RSS MB", "peak RSS - weights MB",
                     "prune s"], rows))

    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
