"""Benchmark the pruning methods on a pretrained model: quality, wall time and peak memory.

Part 1, for every method x pattern on ``--model``: the project's 7M LLaMA ``../shared/models/llama-7m-books``
(``HF_SPARSE_SHARED`` overrides ``../shared``), or ``smollm2``, SmolLM2-135M-Instruct from the test-bed
(``examples/make_testbed.py``; built on first use), or any local folder: wall seconds of ``hf_sparse.prune``
(calibration included), peak RSS, and dense/pruned perplexity, beside the reference code's perplexity where
``../shared/ASSETS.md`` has one. Calibration is 32 windows of 256 tokens drawn with seed 0 from ``calibration.txt``;
perplexity is over the non-overlapping 256-token windows of ``wikitext2-test.txt``: all of them for llama-7m-books,
the first 64 for SmolLM2 (``--max-windows`` changes it) -- the settings of the reference tables in ASSETS.md.

Part 2 shows that pruning memory does not grow with depth beyond the model's own weights: random Llamas of the same
width with 6, 12 and 24 blocks are pruned with SparseGPT, and peak RSS minus the weight bytes stays flat, because the
engine keeps only one block's activations and statistics alive.

``--depth-model DIR`` runs part 2 on a real checkpoint instead, cut to its first 6, 12, ... blocks (``--depths``).

``--seeds 0,1,2`` runs every calibrated method once per calibration seed and shows each cell as the mean, the sample
standard deviation and every seed's value. With ``--wanda-repo`` (a checkout or bare git snapshot of locuslab/wanda)
part 1 also runs the reference code -- the Wanda authors' own ``lib/prune.py`` through ``../shared/tools/peer_ref.py``'s
adaptations to transformers 5 and CPU -- for every method it implements and every seed, with its own calibration draw
(python ``random`` over the tokenized ``calibration.txt``), and puts its perplexities beside ours. ``--cache DIR`` keeps
each finished run, so a long benchmark can be resumed, or run in parts (``--sides hf_sparse``, ``--sides reference``)
and printed together afterwards.

Part 3 (``--time-reference``, with ``--wanda-repo``) times the reference code against ``hf_sparse.prune`` side by
side: for each method x pattern both prune the same model (``--reference-model``, default ``--model``) on the *same*
calibration windows (the reference's draw, or hf_sparse's with ``--windows hf_sparse``), one after the other, each in
a fresh process with the same thread count, and the table shows both wall times, their ratio and both perplexities
on the first ``--reference-eval-windows`` windows.

Every run is a fresh subprocess, so each peak RSS belongs to that run alone. ``--threads N`` fixes torch's thread
count in every run (on a shared machine use fewer threads than cores; see the README).

    python examples/benchmark_pruning.py                          # everything (~1 h on 2 busy CPU cores)
    python examples/benchmark_pruning.py --max-windows 200 --methods wanda,sparsegpt --patterns 2:4
    python examples/benchmark_pruning.py --model smollm2 --methods magnitude,wanda,sparsegpt --patterns 50%,2:4,70% \
        --seeds 0,1,2 --wanda-repo WANDA --depths '' --cache bench-cache
    python examples/benchmark_pruning.py --model smollm2 --skip-quality --depths '' --wanda-repo WANDA \
        --time-reference --methods wanda,sparsegpt --patterns 50%,2:4 --threads 2
    python examples/benchmark_pruning.py --skip-quality --depth-model SMOLLM2_DIR --depths 10,20,30
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
RESULT_PREFIX = "BENCHMARK-RESULT "
MB = 1024 * 1024
SMOLLM2 = "smollm2"
#: Default evaluation windows per model: the reference tables' settings (None: every window).
DEFAULT_WINDOWS = {"llama-7m-books": None, SMOLLM2: 64}
#: Perplexity of the reference code (the Wanda authors' lib/prune.py, calibration seed 0) from ../shared/ASSETS.md.
REFERENCE = {
    "llama-7m-books": {("dense", "-"): 53.06,
                       ("magnitude", "50%"): 56.90, ("magnitude", "2:4"): 63.27, ("magnitude", "70%"): 80.02,
                       ("wanda", "50%"): 56.37, ("wanda", "2:4"): 62.10, ("wanda", "70%"): 75.63,
                       ("sparsegpt", "50%"): 55.08, ("sparsegpt", "2:4"): 57.73, ("sparsegpt", "70%"): 64.43},
    SMOLLM2: {("dense", "-"): 33.94, ("wanda", "50%"): 63.12, ("wanda", "2:4"): 150.81,
              ("sparsegpt", "50%"): 49.66, ("sparsegpt", "2:4"): 69.09},
}


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
    from hf_sparse.threads import set_num_threads

    set_num_threads(job["threads"])
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


def _depth_model(job: dict):
    """A random Llama of llama-7m-books' width with ``blocks`` blocks, or ``--depth-model`` cut to its first blocks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import hf_sparse
    from hf_sparse.threads import set_num_threads

    set_num_threads(job["threads"])
    if job["kind"] == "depth_real":
        # Built with `blocks` blocks and only their weights read, so the process never holds the whole checkpoint
        # and its peak RSS is this depth's own (the checkpoint's later blocks are ignored, not loaded then dropped).
        config = AutoConfig.from_pretrained(job["model"])
        config.num_hidden_layers = job["blocks"]
        return AutoModelForCausalLM.from_pretrained(job["model"], config=config, dtype=torch.float32).eval()
    torch.manual_seed(0)
    # Same width as llama-7m-books; only the number of decoder blocks changes.
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024, num_hidden_layers=job["blocks"],
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def worker_depth(job: dict) -> dict:
    import torch

    import hf_sparse

    model = _depth_model(job)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calibration = torch.randint(0, model.config.vocab_size, (job["num_samples"], job["sequence_length"]),
                                generator=torch.Generator().manual_seed(0))
    rss_loaded = current_rss_bytes()
    start = time.perf_counter()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="sparsegpt", pattern="2:4", calibration=calibration,
                                                    num_samples=job["num_samples"],
                                                    sequence_length=job["sequence_length"], batch_size=8),
                    show_progress=False)
    seconds = time.perf_counter() - start
    return {"weight_bytes": weight_bytes, "rss_loaded": rss_loaded, "peak_rss": peak_rss_bytes(), "seconds": seconds}


def _set_threads(job: dict) -> None:
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])


def _peer_ref(shared: str):
    """The shared reference harness (``tools/peer_ref.py``): it runs the reference code, it is not part of hf_sparse."""
    sys.path.insert(0, str(Path(shared) / "tools"))
    import peer_ref

    return peer_ref


def worker_reference_speed(job: dict) -> dict:
    """Prune with the reference code (``side == "reference"``) or with hf_sparse on the reference's windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparse

    peer_ref = _peer_ref(job["shared"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    calibration_text = (Path(job["shared"]) / "data" / "calibration.txt").read_text(encoding="utf-8")
    stream = tokenizer(calibration_text, return_tensors="pt").input_ids[0]  # tokenized as the harness does
    get_loaders = peer_ref.make_get_loaders(stream)
    if job.get("windows") == "hf_sparse":
        # hf_sparse's own draw (a seeded torch.Generator over the same text) for both sides instead of the reference's.
        ours = hf_sparse.calibration.load_calibration(
            str(Path(job["shared"]) / "data" / "calibration.txt"), tokenizer, num_samples=job["num_samples"],
            sequence_length=job["sequence_length"], seed=job["seed"])

        def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
            return [(row.unsqueeze(0), row.unsqueeze(0)) for row in ours[:nsamples, :seqlen]], None
    n, m = (0, 0) if job["pattern"] == "unstructured" else map(int, job["pattern"].split(":"))
    sparsity = job["sparsity"] if job["sparsity"] is not None else 0.5
    if job["side"] == "reference":
        reference_dir, _commit = peer_ref.export_reference(job["wanda_repo"], job["wanda_src"])
        reference, _digests = peer_ref.import_reference(reference_dir)
        reference.get_loaders = get_loaders
        model = peer_ref.load_model(job["model"], job["sequence_length"])
        hooks = peer_ref.add_rope_hooks(model)
        prune_fn = {"magnitude": reference.prune_magnitude, "wanda": reference.prune_wanda,
                    "sparsegpt": reference.prune_sparsegpt}[job["method"]]
        options = argparse.Namespace(sparsity_ratio=sparsity, nsamples=job["num_samples"], seed=job["seed"],
                                     use_variant=False)
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), peer_ref.tensor_cuda_is_identity():
            prune_fn(options, model, tokenizer, torch.device("cpu"), prune_n=n, prune_m=m)
        seconds = time.perf_counter() - start
        for hook in hooks:
            hook.remove()
    else:
        loader, _ = get_loaders("c4", nsamples=job["num_samples"], seed=job["seed"], seqlen=job["sequence_length"])
        windows = torch.cat([inputs for inputs, _target in loader])  # (num_samples, sequence_length)
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        config = hf_sparse.SparsityConfig(method=job["method"], pattern=job["pattern"], sparsity=job["sparsity"],
                                          calibration=windows, num_samples=job["num_samples"],
                                          sequence_length=job["sequence_length"], batch_size=8)
        start = time.perf_counter()
        hf_sparse.prune(model, config, show_progress=False)
        seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_rss": peak_rss_bytes()}
    if job.get("evaluate", True):
        heldout = (Path(job["shared"]) / "data" / "wikitext2-test.txt").read_text(encoding="utf-8")
        result["perplexity"] = hf_sparse.evaluate.perplexity(model, tokenizer, heldout, sequence_length=256,
                                                             max_windows=job["eval_windows"], show_progress=False)
    return result


REFERENCE_METHODS = ("magnitude", "wanda", "sparsegpt")
WORKERS = {"pretrained": worker_pretrained, "depth": worker_depth, "depth_real": worker_depth,
           "reference_speed": worker_reference_speed}


def run_worker(job: dict) -> dict:
    """Run ``job`` in a fresh Python process and return its result."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                               text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"benchmark worker for {job} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


def run_cached(job: dict, cache: Path | None) -> dict:
    """:func:`run_worker`, reading the result from ``cache`` when this job (thread count aside: results do not depend
    on it) already ran there, and storing it otherwise."""
    if cache is None:
        return run_worker(job)
    key = json.dumps({k: v for k, v in job.items() if k != "threads"}, sort_keys=True)
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    result = run_worker(job)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": json.loads(key), "result": result}))
    os.replace(tmp, path)  # atomic: a run cut short leaves no half-written result
    return result


# ----------------------------------------------------------------------------------------------------------------


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give at least one seed")
    return seeds


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> str:
    """``"70.23 ± 1.11 [69.09 / 71.29 / 70.31]"`` for several values, the value alone for one, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    centre = mean(values)
    sd = (sum((v - centre) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{centre:.2f} ± {sd:.2f} [{' / '.join(f'{v:.2f}' for v in values)}]"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def resolve_model(name: str, parser: argparse.ArgumentParser) -> tuple[Path, str]:
    """``(folder, display name)`` for ``--model``: the shared 7M LLaMA, the SmolLM2 test-bed, or a local folder."""
    if name == SMOLLM2:
        from hf_sparse import testbed

        try:
            return testbed.ensure_testbed(), SMOLLM2
        except testbed.TestbedUnavailable as error:
            parser.error(str(error))
    folder = SHARED / "models" / name if name == "llama-7m-books" else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        parser.error(f"--model {name!r}: no model folder at {folder} (for llama-7m-books set HF_SPARSE_SHARED)")
    return folder, name


def main(argv: list[str] | None = None) -> None:
    from hf_sparse.cli.common import add_threads_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7m-books",
                        help=f"'llama-7m-books' (../shared), '{SMOLLM2}' (the test-bed) or a local model folder "
                             "(default: %(default)s)")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                        help="comma-separated registered methods (default: %(default)s)")
    parser.add_argument("--patterns", default="50%,2:4,70%",
                        help="comma-separated: a percentage for unstructured, or N:M (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate on the first N 256-token windows only (default: all 1458 for llama-7m-books, "
                             "64 for smollm2; 0: all)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated calibration seeds: each calibrated method runs once per seed and the "
                             "table shows the mean and spread (default: --seed)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of finished quality runs: a run already there is read instead of rerun, so a "
                             "long benchmark can be cut short, resumed, or run in parts (timings are never cached)")
    parser.add_argument("--depths", default="6,12,24", help="block counts for the memory-scaling part ('' skips it)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (each still its own process; >1 makes wall times noisier)")
    parser.add_argument("--skip-quality", action="store_true", help="only the memory-scaling part")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--depth-model", type=Path, default=None,
                        help="run the memory-scaling part on this checkpoint cut to --depths blocks")
    parser.add_argument("--wanda-repo", default=None,
                        help="locuslab/wanda checkout or bare git dir: run the reference code beside ours, for every "
                             "seed (part 1), and time it with --time-reference (part 3)")
    parser.add_argument("--sides", type=lambda t: t.split(","), default=["hf_sparse", "reference"],
                        help="with --wanda-repo: which sides of part 1 to run, 'hf_sparse', 'reference' or both "
                             "(default); with --cache, run the sides in separate processes and then both to print "
                             "them together")
    parser.add_argument("--time-reference", action="store_true",
                        help="part 3: prune with the reference code and with hf_sparse on the same windows, one after "
                             "the other, and print both wall times")
    parser.add_argument("--windows", choices=("reference", "hf_sparse"), default="reference",
                        help="part 3: whose calibration draw both sides prune on (default: %(default)s: python "
                             "random over the tokenized text, as the reference code draws)")
    parser.add_argument("--reference-model", type=Path, default=None,
                        help="model for part 3 (default: --model)")
    parser.add_argument("--reference-eval-windows", type=int, default=64,
                        help="perplexity windows after each part-3 run (0 skips the evaluation)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_threads_argument(parser)
    args = parser.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        _set_threads(job)
        result = WORKERS[job["kind"]](job)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    import hf_sparse
    from hf_sparse.threads import default_num_threads

    # Each run is its own process: --jobs of them share the cores the default leaves free.
    threads = args.threads or max(1, default_num_threads() // max(1, args.jobs))
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in hf_sparse.METHODS:
            parser.error(f"--methods: {method!r} is not registered; registered: {sorted(hf_sparse.METHODS)}")
    try:
        patterns = [(text, *parse_pattern(text)) for text in args.patterns.split(",") if text]
    except ValueError as error:
        parser.error(str(error))
    model_dir, model_name = resolve_model(args.model, parser) if not args.skip_quality else (None, args.model)
    max_windows = DEFAULT_WINDOWS.get(model_name) if args.max_windows is None else (args.max_windows or None)
    common = dict(kind="pretrained", shared=str(SHARED), model_dir=str(model_dir), num_samples=args.num_samples,
                  sequence_length=args.sequence_length, seed=args.seed, eval_sequence_length=256,
                  max_windows=max_windows, threads=threads)
    results: dict = {"settings": {k: v for k, v in common.items() if k != "kind"}, "quality": [], "depth": [],
                     "reference_speed": []}
    started = time.perf_counter()

    if not args.skip_quality:
        seeds = args.seeds or [args.seed]
        calibrated = {m: hf_sparse.METHODS[m].needs_calibration for m in methods}
        ours_too = "hf_sparse" in args.sides
        jobs = [dict(common, method="dense", pattern="unstructured", sparsity=None)] if ours_too else []
        # Pattern by pattern, so a run cut short has whole columns (every method at the first pattern) to show. A
        # method without calibration gives the same result for every seed: it runs once.
        if ours_too:
            jobs += [dict(common, method=m, pattern=p, sparsity=s, label=label, seed=seed)
                     for label, p, s in patterns for m in methods for seed in (seeds if calibrated[m] else seeds[:1])]
        if args.wanda_repo and "reference" in args.sides:
            # The reference code on the same model and evaluation, with its own calibration draw for each seed.
            jobs += [dict(common, kind="reference_speed", side="reference", model=str(model_dir),
                          wanda_repo=args.wanda_repo,
                          wanda_src=str(Path(tempfile.gettempdir()) / "benchmark-wanda-src"),
                          eval_windows=max_windows, method=m, pattern=p, sparsity=s, label=label, seed=seed)
                     for label, p, s in patterns for m in methods if m in REFERENCE_METHODS
                     for seed in (seeds if calibrated[m] else seeds[:1])]
        outputs = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            # Each run is reported as it finishes, so a long benchmark cut short still shows what it measured.
            for job, out in zip(jobs, pool.map(lambda j: run_cached(j, args.cache), jobs)):
                outputs.append(out)
                side = "reference code" if job.get("side") == "reference" else "hf_sparse"
                print(f"done: {side} {job['method']} {job.get('label', '')} seed {job['seed']}: perplexity "
                      f"{out['perplexity']:.2f}, prune {out['seconds']:.1f} s", flush=True)
        dense = outputs[0] if ours_too else None
        windows = "all" if max_windows is None else f"first {max_windows}"
        # ../shared/ASSETS.md's numbers hold for its settings only.
        assets = REFERENCE.get(model_name, {}) if (max_windows == DEFAULT_WINDOWS.get(model_name)
                                                   and (args.num_samples, args.sequence_length) == (32, 256)) else {}
        print(f"\nPruning {model_name} ({model_dir}); calibration {args.num_samples} x {args.sequence_length} tokens, "
              f"seeds {', '.join(map(str, seeds))}; perplexity on {windows} non-overlapping 256-token windows of "
              "wikitext2-test.txt")
        if dense is not None:
            print(f"dense perplexity {dense['perplexity']:.2f} (reference code: "
                  f"{_fmt(assets.get(('dense', '-')))}); loading the model + evaluating: peak RSS "
                  f"{dense['peak_rss'] / MB:.0f} MB\n")
        ours: dict = {}
        theirs: dict = {}
        for job, out in zip(jobs, outputs):
            if job["method"] == "dense":
                continue
            side = theirs if job.get("side") == "reference" else ours
            side.setdefault((job["method"], job["label"]), []).append(out)
            results["quality"].append({**job, **out, "dense_perplexity": dense and dense["perplexity"]})
        rows = []
        for method, label in dict.fromkeys([*ours, *theirs]):
            runs = ours.get((method, label), [])
            ppl = [r["perplexity"] for r in ours.get((method, label), [])]
            if args.wanda_repo:
                ref = [r["perplexity"] for r in theirs.get((method, label), [])]
            else:  # ../shared/ASSETS.md's seed-0 number, where it has one
                ref = [assets[(method, label)]] if (method, label) in assets and seeds == [0] else []
            delta = f"{mean(ppl) / mean(ref) - 1:+.1%}" if ref and ppl else "-"
            measured = [f"{runs[0]['sparsity']:.4f}", f"{mean([r['seconds'] for r in runs]):.1f}",
                        f"{max(r['peak_rss'] for r in runs) / MB:.0f}",
                        f"{max(r['peak_rss'] - r['rss_loaded'] for r in runs) / MB:.0f}"] if runs else ["-"] * 4
            rows.append([method, label, spread(ppl), spread(ref), delta, *measured])
        print(table(["method", "pattern", "hf_sparse ppl", "reference ppl", "vs reference (means)", "sparsity",
                     "hf_sparse prune s", "peak RSS MB", "peak - loaded MB"], rows))
        if len(seeds) > 1:
            print("\nppl cells: mean ± sample standard deviation over the calibration seeds [each seed's value]; a "
                  "method without calibration runs once.")

    depths = [int(d) for d in args.depths.split(",") if d]
    if depths:
        kind = "depth" if args.depth_model is None else "depth_real"
        jobs = [dict(kind=kind, blocks=d, num_samples=args.num_samples, sequence_length=args.sequence_length,
                     model=str(args.depth_model), threads=threads) for d in depths]
        outputs = [run_worker(job) for job in jobs]  # one at a time: this part is about memory
        subject = ("random Llamas of llama-7m-books' width (hidden 256, MLP 768)" if args.depth_model is None
                   else f"{args.depth_model} cut to its first N blocks")
        print(f"\nSparseGPT 2:4 on {subject}, calibration {args.num_samples} x {args.sequence_length} random tokens:\n")
        rows = []
        for job, out in zip(jobs, outputs):
            results["depth"].append({**job, **out})
            rows.append([str(job["blocks"]), f"{out['weight_bytes'] / MB:.1f}", f"{out['rss_loaded'] / MB:.0f}",
                         f"{out['peak_rss'] / MB:.0f}", f"{(out['peak_rss'] - out['weight_bytes']) / MB:.0f}",
                         f"{out['seconds']:.1f}"])
        print(table(["blocks", "weights MB", "RSS after build MB", "peak RSS MB", "peak RSS - weights MB",
                     "prune s"], rows))

    if args.time_reference:
        if not args.wanda_repo:
            parser.error("--time-reference needs --wanda-repo (a locuslab/wanda checkout or bare git dir)")
        if model_dir is None:
            model_dir = resolve_model(args.model, parser)[0]
        model_dir = args.reference_model or model_dir
        base = dict(common, kind="reference_speed", model=str(model_dir), wanda_repo=args.wanda_repo,
                    wanda_src=str(Path(tempfile.gettempdir()) / "benchmark-wanda-src"),
                    eval_windows=args.reference_eval_windows, evaluate=args.reference_eval_windows > 0,
                    windows=args.windows)
        rows = []
        for method in [m for m in methods if m in REFERENCE_METHODS]:  # what the reference code implements
            for label, pattern, sparsity in patterns:
                # One after the other, never concurrently: the two runs of a row see the same machine.
                pair = [run_worker(dict(base, side=side, method=method, pattern=pattern, sparsity=sparsity))
                        for side in ("reference", "hf_sparse")]
                reference, ours = pair
                results["reference_speed"].append({"method": method, "pattern": label, "reference": reference,
                                                   "hf_sparse": ours})
                ppl = [f"{r['perplexity']:.2f}" if "perplexity" in r else "-" for r in pair]
                rows.append([method, label, f"{reference['seconds']:.1f}", f"{ours['seconds']:.1f}",
                             f"{ours['seconds'] / reference['seconds']:.2f}", *ppl])
        print(f"\nPruning wall time, reference code (locuslab/wanda lib/prune.py via tools/peer_ref.py) vs hf_sparse, "
              f"on {model_dir}, the same {args.num_samples} x {args.sequence_length} calibration windows "
              f"({args.windows}'s draw, seed {args.seed}), threads {args.threads or 'torch default'}; perplexity on "
              f"the first {args.reference_eval_windows} 256-token windows of wikitext2-test.txt:\n")
        print(table(["method", "pattern", "reference s", "hf_sparse s", "ratio", "reference ppl", "hf_sparse ppl"],
                    rows))

    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
