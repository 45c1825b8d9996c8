"""Quick start: prune a small pretrained LLaMA and compare perplexity before and after.

Uses the project's model and texts in ``../shared`` (or wherever ``HF_SPARSE_SHARED`` points) when they are there,
else the copies vendored in ``demo/`` (a float16 copy of the same model, loaded here in float32, and slices of
WikiText-2), so it runs on a fresh clone with no network.

    python examples/quickstart.py                                  # Wanda 2:4
    python examples/quickstart.py --method sparsegpt --pattern unstructured --sparsity 0.7
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from hf_sparse.record import read_record, write_record

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))


def find_assets() -> dict:
    """The pretrained model and texts: ``../shared`` when present, else the vendored ``demo/`` copies."""
    shared = {"model": SHARED / "models" / "llama-7m-books", "calibration": SHARED / "data" / "calibration.txt",
              "heldout": SHARED / "data" / "wikitext2-test.txt", "source": f"shared assets in {SHARED}",
              "max_windows": 200}
    if all(shared[key].exists() for key in ("model", "calibration", "heldout")):
        return shared
    demo = REPO / "demo"
    # The held-out slice is small (about 60 windows of 256 tokens): evaluate all of it.
    return {"model": demo / "llama-7m-books-fp16", "calibration": demo / "calibration-slice.txt",
            "heldout": demo / "heldout-slice.txt", "source": f"vendored demo assets in {demo}", "max_windows": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prune a small pretrained LLaMA and compare perplexity.")
    parser.add_argument("--method", default="wanda", help=f"one of {sorted(hf_sparse.METHODS)} (default wanda)")
    parser.add_argument("--pattern", default="2:4", help="'unstructured' or N:M (default 2:4)")
    parser.add_argument("--sparsity", type=float, default=None, help="for unstructured (default 0.5)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="held-out 256-token windows to score (default: 200 on ../shared, all of the demo slice)")
    parser.add_argument("--output", default="pruned-demo", help="where to save the pruned model (default ./pruned-demo)")
    args = parser.parse_args(argv)

    assets = find_assets()
    max_windows = args.max_windows if args.max_windows is not None else assets["max_windows"]
    print(f"using the {assets['source']}")
    # float32 on CPU: the demo checkpoint is stored in float16 only to keep the clone small.
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    heldout = assets["heldout"].read_text(encoding="utf-8")

    def ppl() -> float:
        return hf_sparse.evaluate.perplexity(model, tokenizer, heldout, sequence_length=256, max_windows=max_windows)

    dense = ppl()
    config = hf_sparse.SparsityConfig(
        method=args.method, pattern=args.pattern, sparsity=args.sparsity, calibration=str(assets["calibration"]),
        num_samples=args.num_samples, sequence_length=args.sequence_length, seed=0,
    )
    start = time.perf_counter()
    record = hf_sparse.prune(model, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    pruned = ppl()

    # Keep the numbers with the checkpoint: they land in config.json under sparsity_config.evaluation.
    record = read_record(model)
    record.evaluation.update(dense_perplexity=round(dense, 4), pruned_perplexity=round(pruned, 4),
                             eval_data=assets["heldout"].name, eval_sequence_length=256)
    write_record(model, record)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)

    assert math.isfinite(pruned)
    print(f"method             {args.method} ({config.pattern})")
    print(f"dense perplexity   {dense:.2f}")
    print(f"pruned perplexity  {pruned:.2f}")
    print(f"achieved sparsity  {record.overall_sparsity:.4f} of {len(record.modules)} linear layers")
    print(f"prune time         {seconds:.1f} s")
    print(f"saved to           {Path(args.output).resolve()}")


if __name__ == "__main__":
    main()
