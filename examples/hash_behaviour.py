"""Fingerprint of what every registered pruning method does to the demo model: one SHA-256 per method and pattern.

Run it before and after a refactoring that must not change behaviour: the lines must be identical. Each line hashes
the pruned state dict (names, shapes, dtypes, bytes), the sparsity record as JSON (sorted keys) and the keep-masks
read back from the record. The demo model is loaded in float32; calibration is 8 windows of 64 tokens from the
demo calibration slice; the structured methods run with small options so that each takes seconds.

    python examples/hash_behaviour.py            # every method, on a fresh clone (uses demo/ only)
    python examples/hash_behaviour.py wanda flap # some of them
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "llama-7m-books-fp16"
CALIBRATION = ROOT / "demo" / "calibration-slice.txt"

# (method, pattern, sparsity, options): every registered method at a pattern it supports.
RUNS = [
    *[(method, pattern, 0.5, {}) for method in ("magnitude", "wanda", "sparsegpt") for pattern in ("2:4", "unstructured")],
    ("fista", "2:4", 0.5, {"iterations": 5}),
    ("fista", "unstructured", 0.5, {"iterations": 5}),
    ("flap", "structured", 0.2, {}),
    ("shortgpt", "structured", 0.2, {}),
    ("sleb", "structured", 0.2, {}),
    ("pip", "structured", 0.2, {}),
    ("disp_llm", "structured", 0.2, {"steps": 4, "windows_per_step": 2}),
]


def fingerprint(model, record) -> str:
    """SHA-256 over the state dict, the record's JSON and the masks read back from the model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(json.dumps(record.to_dict(), sort_keys=True).encode())
    for name, mask in sorted(hf_sparse.get_masks(model).items()):
        digest.update(name.encode())
        digest.update(mask.to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help="methods to run (default: all of RUNS)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    registered = set(hf_sparse.METHODS)
    covered = {method for method, *_ in RUNS}
    if registered != covered:
        raise SystemExit(f"RUNS covers {sorted(covered)} but the registry has {sorted(registered)}: update RUNS")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    for method, pattern, sparsity, options in RUNS:
        if args.methods and method not in args.methods:
            continue
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        config = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=sparsity, method_options=options,
                                          calibration=str(CALIBRATION), num_samples=8, sequence_length=64, seed=0)
        record = hf_sparse.prune(model, config, tokenizer=tokenizer, show_progress=False)
        print(f"{method:10s} {pattern:13s} {sparsity:.2f} {record.overall_sparsity:.6f} {fingerprint(model, record)}",
              flush=True)


if __name__ == "__main__":
    main()
