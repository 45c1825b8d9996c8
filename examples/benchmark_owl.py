"""OWL against uniform sparsity: perplexity of Wanda and SparseGPT at several sparsities, plus a short M/λ sweep.

Each run is a fresh subprocess through ``benchmark_pruning.py``'s worker (same calibration, pruning and evaluation
code paths). Calibration: 32 windows of 256 tokens, seed 0, from ``calibration.txt``; perplexity on the first
``--max-windows`` non-overlapping 256-token windows of ``wikitext2-test.txt``.

    python examples/benchmark_owl.py --model ../shared/models/llama-7m-books --max-windows 100
    python examples/benchmark_owl.py --model smollm2 --max-windows 64 --methods wanda --sparsities 0.7 \\
        --sweep "3:0.08,5:0.04,5:0.12,7:0.08,10:0.08"

``--model smollm2`` is the SmolLM2-135M-Instruct test-bed (built on first use, see ``examples/make_testbed.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_pruning import SHARED, resolve_model, run_worker, table  # noqa: E402  (the shared worker and table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7m-books",
                        help="llama-7m-books (the shared model), smollm2 (the test-bed) or a model folder")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--sweep", default="",
                        help="comma-separated m:lambda pairs run with the first method at the last sparsity")
    parser.add_argument("--sweep-method", default=None, help="method of the sweep (default: the first of --methods)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    model_dir, model_name = resolve_model(args.model, parser)
    methods = [m for m in args.methods.split(",") if m]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    common = dict(kind="pretrained", shared=str(SHARED), model_dir=str(model_dir), num_samples=32,
                  sequence_length=256, seed=0, eval_sequence_length=256, max_windows=args.max_windows,
                  pattern="unstructured", threads=1)
    jobs = [] if args.no_dense else [dict(common, method="dense", sparsity=None)]
    for method in methods:
        for sparsity in sparsities:
            jobs.append(dict(common, method=method, sparsity=sparsity, sparsity_profile="uniform"))
            jobs.append(dict(common, method=method, sparsity=sparsity, sparsity_profile="owl",
                             profile_options={"m": 5, "lambda": 0.08}))
    for pair in [p for p in args.sweep.split(",") if p]:
        m, lam = (float(x) for x in pair.split(":"))
        if (m, lam) != (5.0, 0.08):
            jobs.append(dict(common, method=args.sweep_method or methods[0], sparsity=sparsities[-1],
                             sparsity_profile="owl", profile_options={"m": m, "lambda": lam}))
    started = time.perf_counter()
    outputs = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for job, out in zip(jobs, pool.map(run_worker, jobs)):
            outputs.append(out)  # one line per finished run, so a long grid shows progress
            print("RUN", json.dumps({**job, **out}), flush=True)
    dense = None if args.no_dense else outputs[0]["perplexity"]
    dense_text = "not run" if dense is None else f"{dense:.2f}"
    print(f"\n{model_name}: dense perplexity {dense_text} (first {args.max_windows} windows of 256 tokens); "
          f"calibration 32 x 256, seed 0\n")
    rows = []
    for job, out in zip(jobs, outputs):
        if job["method"] == "dense":
            continue
        options = job.get("profile_options") or {}
        profile = job["sparsity_profile"] + (f" (M={options['m']:g}, λ={options['lambda']:g})" if options else "")
        blocks = out.get("block_sparsity") or {}
        spread = (f"{min(blocks.values()):.3f}–{max(blocks.values()):.3f}" if blocks else "")
        rows.append([job["method"], f"{job['sparsity']:.0%}", profile, f"{out['perplexity']:.2f}",
                     f"{out['sparsity']:.4f}", spread, f"{out['seconds']:.0f}"])
    print(table(["method", "sparsity", "profile", "perplexity", "achieved", "block range", "seconds"], rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"dense": dense, "runs": [{**j, **o} for j, o in zip(jobs, outputs)]},
                                        indent=1))


if __name__ == "__main__":
    main()
