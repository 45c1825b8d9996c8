"""Time FISTAPruner against SparseGPT per decoder block on a random-weight, Llama-shaped model.

Pruning speed depends on the shapes of the linear operators and on the number of calibration tokens, not on what
the weights have learned, so a randomly initialised ``LlamaForCausalLM`` with a few decoder blocks is enough to
measure it, and no checkpoint has to be downloaded. Every method prunes the same weights (the model is rebuilt from
the same seed before each run) on the same random token ids, through the public ``hf_sparse.prune`` API.

    # GPU, one Llama-7B-shaped block (hidden 4096, intermediate 11008, 32 heads), float16 weights
    python examples/benchmark_fista_speed.py --preset 7b --blocks 1

    # CPU, small widths
    python examples/benchmark_fista_speed.py --preset tiny
    python examples/benchmark_fista_speed.py --preset tiny --hidden-size 1024 --intermediate-size 2752

    # unstructured 50%, FISTA only, three repeats
    python examples/benchmark_fista_speed.py --pattern unstructured --sparsity 0.5 --methods fista --repeats 3

On a CPU that other jobs are also using, ``--threads 1`` avoids the worst of the noise: with every core busy, each
multi-threaded torch op waits for its slowest thread, and runs can become many times slower and very uneven.

It prints a markdown table headed by the command line and the machine. The numbers depend entirely on the hardware
(and, on a shared machine, on what else is running): they are only comparable within one table. The authors have
not measured anything with this script on a GPU; the GPU paths (CUDA timing and memory) are written to the PyTorch
documentation but untested.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_sparse
from hf_sparse.cli.common import add_threads_argument, apply_threads, parse_method_option

# Llama shapes. num_key_value_heads < num_attention_heads is grouped-query attention (smaller k_proj and v_proj).
PRESETS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
           "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 4,
             "vocab_size": 4096},
}
# Command-line override -> LlamaConfig field it replaces.
SHAPE_OVERRIDES = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}
BASELINE = "sparsegpt"  # the ratio column divides by this method's time
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape")
    shape.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    shape.add_argument("--hidden-size", type=int, help="override the preset's hidden size")
    shape.add_argument("--intermediate-size", type=int, help="override the preset's MLP width")
    shape.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    shape.add_argument("--num-kv-heads", type=int, help="override the preset's key/value heads")
    shape.add_argument("--blocks", type=int, default=2, help="decoder blocks in the model (default 2)")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--pattern", default="2:4", help="'unstructured' or N:M such as '2:4' (default 2:4)")
    pruning.add_argument("--sparsity", type=float, help="fraction removed, for --pattern unstructured (default 0.5)")
    pruning.add_argument("--methods", default=f"{BASELINE},fista", help="comma-separated registered method names")
    pruning.add_argument("--num-samples", type=int, default=16, help="calibration sequences (default 16)")
    pruning.add_argument("--sequence-length", type=int, default=512, help="tokens per sequence (default 512)")
    pruning.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    pruning.add_argument("--method-option", dest="method_options", action="append", type=parse_method_option,
                         default=[], metavar="KEY=VALUE",
                         help="an option for the FISTA runs only, repeatable (e.g. rounds=3; the value is read as JSON)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="'cuda', 'cuda:1', 'cpu'... (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: float16 on cuda, float32 on cpu)")
    add_threads_argument(run)  # on a CPU shared with other jobs, busy cores stall every multi-threaded op
    run.add_argument("--repeats", type=int, default=1, help="runs per method; the table shows the fastest")
    run.add_argument("--seed", type=int, default=0, help="seeds the random weights and the random token ids")
    args = parser.parse_args(argv)
    for name in ("blocks", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in hf_sparse.METHODS]
    if not args.methods or unknown:
        parser.error(f"--methods {unknown or '(empty)'}: choose from {sorted(hf_sparse.METHODS)}")
    return args


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {requested!r} needs CUDA, but this PyTorch ({torch.__version__}) sees no CUDA device; "
                "use --device cpu (or leave --device out)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    # float16 matmuls are slow (or missing) on many CPUs; on GPUs it is how a 7B model is normally held.
    if requested is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    shape = dict(PRESETS[args.preset])
    for option, config_field in SHAPE_OVERRIDES.items():
        if getattr(args, option) is not None:
            shape[config_field] = getattr(args, option)
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    if shape["hidden_size"] % heads or heads % kv_heads:
        raise SystemExit(f"hidden size {shape['hidden_size']} must divide into {heads} heads, and {heads} heads into "
                         f"{kv_heads} key/value heads")
    return LlamaConfig(**shape, num_hidden_layers=args.blocks, max_position_embeddings=args.sequence_length,
                       use_cache=False)


def build_model(config: LlamaConfig, seed: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The same random weights for every call with the same seed: initialised in float32 on the CPU, then cast."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def weight_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        skeleton = LlamaForCausalLM(config)
    return sum(parameter.numel() for parameter in skeleton.parameters()) * dtype.itemsize


def random_token_ids(vocab_size: int, num_samples: int, sequence_length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, sequence_length), generator=generator)


def sparsity_config(method: str, args: argparse.Namespace, calibration: torch.Tensor,
                    device: torch.device) -> hf_sparse.SparsityConfig:
    # Options are FISTA's: the baseline keeps its defaults, so the ratio shows what a FISTA setting costs.
    options = dict(args.method_options) if method == "fista" else {}
    return hf_sparse.SparsityConfig(
        method=method, pattern=args.pattern, sparsity=args.sparsity, calibration=calibration,
        num_samples=args.num_samples, sequence_length=args.sequence_length, batch_size=args.batch_size,
        seed=args.seed, device=str(device), method_options=options,
    )


def warm_up(device: torch.device) -> None:
    """Load the BLAS and LAPACK kernels (cuBLAS/cuSOLVER handles on a GPU) before any timing, so that the first
    method measured does not pay their start-up cost."""
    matrix = torch.randn(64, 64, device=device, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        spd = (matrix @ matrix.T).to(dtype) + 64 * torch.eye(64, device=device, dtype=dtype)
        torch.cholesky_solve(spd, torch.linalg.cholesky(spd))
    synchronize(device)


def synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kibibytes on Linux


@dataclass
class MethodTimings:
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def fastest(self) -> float:
        return min(self.seconds)


def time_pruning(pruning: hf_sparse.SparsityConfig, config: LlamaConfig, seed: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[float, int]:
    """Seconds spent in ``hf_sparse.prune`` on a freshly built model, and the peak memory of the run."""
    model = build_model(config, seed, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    hf_sparse.prune(model, pruning, show_progress=False)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = peak_memory_bytes(device)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next run starts from the same free memory
    return elapsed, peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo has the model name
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def pattern_label(config: hf_sparse.SparsityConfig) -> str:
    return config.pattern if config.parsed_pattern.is_n_m else f"{config.pattern} {config.sparsity:.0%}"


def format_report(args: argparse.Namespace, config: LlamaConfig, device: torch.device, dtype: torch.dtype,
                  pattern: str, results: dict[str, MethodTimings]) -> str:
    baseline = results.get(BASELINE)
    lines = [
        f"Command: `{shlex.join(sys.argv)}`",
        "",
        f"Machine: torch {torch.__version__}, {device.type} ({device_name(device)}), dtype {str(dtype).removeprefix('torch.')}",
        "",
        f"Model: random-weight Llama, {args.blocks} block(s), hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, {config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, vocab "
        f"{config.vocab_size}. Calibration: {args.num_samples} x {args.sequence_length} random tokens, batch "
        f"{args.batch_size}, seed {args.seed}. Times: fastest of {args.repeats} run(s). FISTA options: "
        f"{dict(args.method_options) or 'defaults'}.",
        "",
        "| method | pattern | total s | s per block | ratio to SparseGPT | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for method, timings in results.items():
        ratio = f"{timings.fastest / baseline.fastest:.2f}" if baseline else "n/a"
        lines.append(f"| {method} | {pattern} | {timings.fastest:.2f} | {timings.fastest / args.blocks:.2f} | {ratio} | "
                     f"{timings.peak_bytes / MB:,.0f} MB |")
    if device.type == "cuda":
        memory_note = (f"torch.cuda.max_memory_allocated during the run, including the model's "
                       f"{weight_bytes(config, dtype) / MB:,.0f} MB of weights on the device")
    else:
        memory_note = ("process peak RSS (ru_maxrss) after the run; it never decreases, so a row also covers the "
                       "rows above it")
    lines += ["", f"Peak memory: {memory_note}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = llama_config(args)
    calibration = random_token_ids(config.vocab_size, args.num_samples, args.sequence_length, args.seed)
    # Built once up front so that a bad --pattern/--sparsity fails before any model is built.
    configs = {method: sparsity_config(method, args, calibration, device) for method in args.methods}

    warm_up(device)
    results = {method: MethodTimings() for method in args.methods}
    # Methods alternate within each repeat, so a slow drift of the machine (heat, other jobs) hits all of them.
    for repeat in range(args.repeats):
        for method in args.methods:
            seconds, peak = time_pruning(configs[method], config, args.seed, device, dtype)
            results[method].seconds.append(seconds)
            results[method].peak_bytes = max(results[method].peak_bytes, peak)
            print(f"  run {repeat + 1}/{args.repeats} {method}: {seconds:.2f} s", file=sys.stderr, flush=True)
    if args.repeats > 1:
        for method, timings in results.items():
            print(f"  {method}: median {statistics.median(timings.seconds):.2f} s over {args.repeats} runs",
                  file=sys.stderr)

    pattern = pattern_label(next(iter(configs.values())))
    print(format_report(args, config, device, dtype, pattern, results))


if __name__ == "__main__":
    main()
