"""Compact checkpoints against dense ones: file sizes next to the ideal, load time, and peak memory while loading.

Part 1, on the shared 7M model (``../shared/models/llama-7m-books``; ``HF_SPARSE_SHARED`` overrides ``../shared``) and
on SmolLM2-135M when its float32 test-bed folder exists (``--smollm2``, default: ``hf_sparse.testbed.testbed_dir()``,
built by ``hf_sparse.testbed.ensure_testbed()``): magnitude
pruning at 2:4, 50% and 70% (the stored size depends on the pattern, not the method), the model cast to float16 and
saved dense and with ``compressed=True``. Printed: the files' bytes, the decoder linears' stored bytes against their
dense float16 bytes and the ideal ratio (2:4 and 50%: 0.5625, 70%: 0.3625), and the median load time of each folder
(``from_pretrained``, measured side by side in this process).

Part 2, peak memory: a random Llama with large matrices (hidden 1024, MLP 4096), pruned 2:4 and 70%, saved in
float16 dense and compact, each loaded in a fresh subprocess as float16 and as float32. Printed per load: the bytes
the loaded model holds, the peak during the load, and the peak above the model in MiB and in units of the largest
matrix (the bound: one decompressed matrix), sampled (glibc's allocated bytes, RssAnon) on the default threaded
loader and counted exactly (torch profiler, synchronous loader). Linux with glibc only.

    python examples/benchmark_compact.py                 # both parts (a few minutes on 2 busy cores)
    python examples/benchmark_compact.py --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
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


_LOAD_CHILD = r"""
import ctypes, json, os, sys, threading, time, torch
import hf_sparse
from hf_sparse.threads import set_num_threads
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
set_num_threads()  # the parent's --threads, passed in HF_SPARSE_NUM_THREADS
folder, dtype, mode = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL("libc.so.6")

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc.mallinfo2.restype = MallInfo2

def allocated():  # bytes malloc has handed out and not had back (all threads): what the process holds
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd

def anon():  # anonymous resident memory: allocations plus what the allocator keeps cached
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

def load():
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)

result = {}
if mode == "sampled":  # the default (threaded) loader; peaks sampled every 0.5 ms
    peak, done = {"alloc": 0, "anon": 0}, threading.Event()
    def sample():
        while not done.is_set():
            peak["alloc"] = max(peak["alloc"], allocated())
            peak["anon"] = max(peak["anon"], anon())
            time.sleep(0.0005)
    base_alloc, base_anon = allocated(), anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model = load()
    done.set(); thread.join()
    after_alloc, after_anon = allocated(), anon()
    result = {"peak": max(peak["alloc"], after_alloc) - base_alloc, "after": after_alloc - base_alloc,
              "anon_peak": max(peak["anon"], after_anon) - base_anon, "anon_after": after_anon - base_anon}
else:  # "counted": every allocation through torch's allocator, synchronous loader (all on the profiled thread)
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    from torch.profiler import ProfilerActivity, profile
    files = {os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = load()
    live = top = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        if abs(event.nbytes()) in files:  # safetensors registers each mapped file once: file pages, not allocations
            continue
        live += event.nbytes()
        top = max(top, live)
    result = {"peak": top, "after": live}
result["params"] = sum(p.numel() * p.element_size() for p in model.parameters())
result["largest"] = max(m.weight.numel() * m.weight.element_size() for m in model.modules()
                        if isinstance(m, torch.nn.Linear))
print("%s" + json.dumps(result))
""" % RESULT_PREFIX


def _child(folder: Path, dtype: str, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(folder), dtype, mode], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"loading {folder} failed:\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def memory_table(repeats: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparse

    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for label, pattern, sparsity in (("2:4", "2:4", 0.5), ("70%", "unstructured", 0.7)):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
            hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=sparsity),
                            show_progress=False)
            model = model.half()
            if not folders:
                folders["dense (2:4 weights)"] = Path(tmp) / "dense"
                model.save_pretrained(folders["dense (2:4 weights)"])
            folders[f"compact {label}"] = Path(tmp) / f"compact-{label[:2]}"
            model.save_pretrained(folders[f"compact {label}"], compressed=True)
            del model
        print("\n## Memory while loading (random Llama: hidden 1024, MLP 4096, 4 blocks, vocab 4096; float16 "
              "checkpoints, 144 MiB of weights; the largest matrix is 8 MiB in float16, 16 MiB in float32)\n")
        print("Each load in a fresh process. *Held*: bytes the process holds after the load (above its state after "
              "the imports); *peak*: the most it held during the load; *above model* = peak - held, also in units "
              "of the largest matrix in the loaded dtype. *malloc*: glibc's count of allocated bytes (mallinfo2, "
              f"all threads), sampled every 0.5 ms during the default threaded load, median of {repeats}. "
              "*counted*: every allocation through torch's CPU allocator, synchronous load, exact. "
              "*RssAnon*: what the OS sees (allocations plus allocator caching), sampled.\n")
        print("| checkpoint | load dtype | params | malloc held | malloc peak | above model (malloc) "
              "| counted above model | RssAnon peak | RssAnon after |")
        print("|---|---|---|---|---|---|---|---|---|")
        for dtype in ("float16", "float32"):
            for label, folder in folders.items():
                runs = [_child(folder, dtype, "sampled") for _ in range(repeats)]
                counted = _child(folder, dtype, "counted")

                def med(key):
                    return statistics.median(run[key] for run in runs)

                largest = runs[0]["largest"]
                above = med("peak") - med("after")
                exact = counted["peak"] - counted["after"]
                print(f"| {label} | {dtype} | {runs[0]['params'] / MB:.1f} MiB | {med('after') / MB:.1f} MiB "
                      f"| {med('peak') / MB:.1f} MiB | {above / MB:.2f} MiB ({above / largest:.2f}x) "
                      f"| {exact / MB:.2f} MiB ({exact / largest:.2f}x) | {med('anon_peak') / MB:.1f} MiB "
                      f"| {med('anon_after') / MB:.1f} MiB |")
    print("\nA dense float16 load holds almost nothing: its weights are views of the memory-mapped file. A compact "
          "load holds the decoded linears (128 MiB); the embeddings, stored dense, stay mapped. Loaded as float32, "
          "both hold the whole model. The compressed file is memory-mapped while it loads (page cache, not counted "
          "above).")


def main() -> None:
    sys.path.insert(0, str(REPO))
    from hf_sparse.cli.common import add_threads_argument, apply_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "llama-7m-books"))
    parser.add_argument("--smollm2", default=None,
                        help="float32 SmolLM2-135M folder, used when it exists (default: the hf_sparse test-bed)")
    parser.add_argument("--no-smollm2", action="store_true", help="sizes and load times of the 7M model only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    add_threads_argument(parser)
    args = parser.parse_args()
    # The loads run in subprocesses, which read the count from the environment (hf_sparse.threads).
    os.environ["HF_SPARSE_NUM_THREADS"] = str(apply_threads(args))
    if args.smollm2 is None:
        from hf_sparse.testbed import testbed_dir

        args.smollm2 = str(testbed_dir())
    if not args.skip_sizes:
        size_table("llama-7m-books", Path(args.model), args.repeats)
        if args.no_smollm2:
            pass
        elif Path(args.smollm2).is_dir():
            size_table("SmolLM2-135M", Path(args.smollm2), args.repeats)
        else:
            print(f"\n(SmolLM2-135M skipped: no float32 folder at {args.smollm2})")
    if not args.skip_memory:
        memory_table(args.repeats)


if __name__ == "__main__":
    main()
