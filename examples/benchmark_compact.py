"""Compact checkpoints against dense ones: file sizes next to the ideal, load time, and peak memory while loading.

Part 1, on the shared 7M model (``../shared/models/llama-7m-books``; ``HF_SPARSE_SHARED`` overrides ``../shared``) and
on SmolLM2-135M when a float32 folder of it exists (``--smollm2``, default ``/work/notes/smollm2-f32``): magnitude
pruning at 2:4, 50% and 70% (the stored size depends on the pattern, not the method), the model cast to float16 and
saved dense and with ``compressed=True``. Printed: the files' bytes, the decoder linears' stored bytes against their
dense float16 bytes and the ideal ratio (2:4 and 50%: 0.5625, 70%: 0.3625), and the median load time of each folder
(``from_pretrained``, measured side by side in this process).

Part 2, peak memory: a random Llama with large matrices (hidden 1024, MLP 4096), 2:4-pruned, in float16, loaded
dense and compact, each load in a fresh subprocess; printed: peak RSS of each and the difference, next to the size
of the largest single matrix (the bound is "one decompressed matrix above the dense load").

    python examples/benchmark_compact.py                 # both parts (a few minutes on 2 busy cores)
    python examples/benchmark_compact.py --skip-memory
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

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
CASES = (("2:4", "2:4", 0.5, 0.5625), ("50%", "unstructured", 0.5, 0.5625), ("70%", "unstructured", 0.7, 0.3625))
RESULT_PREFIX = "BENCHMARK-RESULT "
MB = 1024 * 1024


def _linear_bytes(folder: Path, modules) -> tuple[int, int]:
    """(stored bytes of the pruned linears' entries, their dense float16 bytes) in a checkpoint folder."""
    from safetensors import safe_open

    from hf_sparse.formats.checkpoint import weight_files

    stored = dense = 0
    files, _ = weight_files(folder)
    for name in files:
        with safe_open(str(folder / name), framework="pt") as reader:
            for key in reader.keys():
                prefix, _, suffix = key.rpartition(".")
                if prefix not in modules:
                    continue
                shape = reader.get_slice(key).get_shape()
                size = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I64": 8}[reader.get_slice(key).get_dtype()]
                stored += size * (shape[0] * (shape[1] if len(shape) > 1 else 1))
                if suffix == "weight_layout":
                    rows, cols = reader.get_tensor(key).tolist()[:2]
                    dense += 2 * rows * cols
                elif suffix == "weight" and f"{prefix}.weight_layout" not in reader.keys():
                    dense += 2 * shape[0] * shape[1]  # stored dense
    return stored, dense


def _load_seconds(folder: Path, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def size_table(name: str, source: Path, repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_sparse
    from hf_sparse.formats import checkpoint_bytes

    hf_logging.disable_progress_bar()
    print(f"\n## {name}: file size and load time, float16, dense vs compressed=True\n")
    print("| pruning | dense file | compact file | file ratio | decoder linears stored / dense fp16 | ideal "
          "| off ideal | load dense | load compact | load ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, pattern, sparsity, ideal in CASES:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=sparsity),
                            show_progress=False)
            model = model.half()
            dense_dir, compact_dir = Path(tmp) / f"{label}-dense", Path(tmp) / f"{label}-compact"
            model.save_pretrained(dense_dir)
            model.save_pretrained(compact_dir, compressed=True)
            modules = set(model.config.sparsity_config["modules"])
            stored, dense = _linear_bytes(compact_dir, modules)
            check = AutoModelForCausalLM.from_pretrained(compact_dir, dtype=torch.float16)
            reference = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float16)
            identical = all(torch.equal(check.state_dict()[k], v) for k, v in reference.state_dict().items())
            if not identical:
                raise SystemExit(f"{name} {label}: the compact checkpoint did not reload identically")
            load_dense, load_compact = _load_seconds(dense_dir, repeats), _load_seconds(compact_dir, repeats)
            file_dense, file_compact = checkpoint_bytes(dense_dir), checkpoint_bytes(compact_dir)
            ratio = stored / dense
            print(f"| {label} | {file_dense / MB:.2f} MiB | {file_compact / MB:.2f} MiB | {file_compact / file_dense:.4f}"
                  f" | {ratio:.4f} | {ideal:.4f} | {100 * (ratio / ideal - 1):+.2f}% | {load_dense:.3f} s "
                  f"| {load_compact:.3f} s | {load_compact / load_dense:.2f}x |")
            del model, check, reference
    print(f"\nReloads checked identical to the dense float16 checkpoint (torch.equal on every tensor). Load times: "
          f"median of {repeats} from_pretrained calls per folder, same process, page cache warm.")


_LOAD_CHILD = """
import json, sys, threading, time, torch
import hf_sparse
from transformers import AutoModelForCausalLM

def anon():  # anonymous resident memory in bytes: what the process allocated, not mmapped file pages it read
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

peak, done = [anon()], threading.Event()
def sample():  # /proc has no anonymous high-water mark: sample it every millisecond during the load
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

before = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
done.set(); thread.join()
after = anon()
params = sum(p.numel() * p.element_size() for p in model.parameters())
print("%s" + json.dumps({"before": before, "peak": max(peak[0], after), "after": after, "params": params}))
""" % RESULT_PREFIX


def _child_peak(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(folder)], capture_output=True, text=True, env=env,
                          check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def memory_table(repeats: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparse

    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    model = model.half()
    largest = max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, compact_dir = Path(tmp) / "dense", Path(tmp) / "compact"
        model.save_pretrained(dense_dir)
        model.save_pretrained(compact_dir, compressed=True)
        del model
        dense = [_child_peak(dense_dir) for _ in range(repeats)]
        compact = [_child_peak(compact_dir) for _ in range(repeats)]
    def median(runs, key):
        return statistics.median(r[key] - r["before"] for r in runs)

    print(f"\n## Memory while loading (random Llama, hidden 1024, MLP 4096, 4 blocks, 2:4, float16; "
          f"{dense[0]['params'] / MB:.1f} MiB of weights)\n")
    print(f"Each load in a fresh process; anonymous RSS (RssAnon, sampled every ms) above the process after its "
          f"imports, median of {repeats}. A dense load maps the file and allocates almost nothing; a compact load "
          f"allocates the decoded weights.\n")
    print("| load | peak RssAnon above imports | RssAnon after load | transient (peak - after) |")
    print("|---|---|---|---|")
    for label, runs in (("dense checkpoint", dense), ("compact checkpoint", compact)):
        peak, after = median(runs, "peak"), median(runs, "after")
        print(f"| {label} | {peak / MB:.1f} MiB | {after / MB:.1f} MiB | {(peak - after) / MB:.1f} MiB |")
    print(f"| compact - dense (peak) | {(median(compact, 'peak') - median(dense, 'peak')) / MB:+.1f} MiB | | |")
    print(f"\nLargest single matrix: {largest / MB:.1f} MiB; the claim checked: the transient of a compact load stays "
          f"within about one decompressed matrix.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "llama-7m-books"))
    parser.add_argument("--smollm2", default="/work/notes/smollm2-f32",
                        help="float32 SmolLM2-135M folder, used when it exists")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if not args.skip_sizes:
        size_table("llama-7m-books", Path(args.model), args.repeats)
        if Path(args.smollm2).is_dir():
            size_table("SmolLM2-135M", Path(args.smollm2), args.repeats)
        else:
            print(f"\n(SmolLM2-135M skipped: no float32 folder at {args.smollm2})")
    if not args.skip_memory:
        memory_table(args.repeats)


if __name__ == "__main__":
    main()
