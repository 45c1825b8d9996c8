"""2:4 kernels against dense on a GPU: per linear shape and token count, then prefill and decode of a whole model.

Nothing here has been run by the authors: hf_sparse's CI has no GPU. The numbers in ``hf_sparse.kernels.dispatch``
come from the H100 measurement quoted in issue 16; this script is how to check them on your GPU and how to make a
dispatch table for another one.

Part 1, linear shapes of the preset (``--preset 7b``: 4096x4096, 11008x4096, 4096x11008; ``70b``: 8192x8192,
28672x8192, 8192x28672, 1024x8192) at 1 ... 16384 tokens: CUDA-event time of dense ``F.linear`` and of the cuSPARSELt
2:4 matmul on the same random 2:4 weight, float16 (``--dtype bfloat16`` too), and their ratio. ``--write-table
t.json`` writes a ``DispatchTable`` with, per shape, the smallest token count from which sparse was at least
``--margin`` (default 5%) faster at that and every larger count; load it with
``hf_sparse.kernels.DispatchTable.load("t.json")``.

Part 2 (``--model DIR``, a 2:4-pruned checkpoint): prefill of ``--prefill-tokens`` and greedy decode of
``--decode-tokens`` tokens, dense and after ``enable_2of4`` (with ``--table`` or the shipped table), tokens/s and the
ratio; the logits of the two prefills are compared.

    python examples/benchmark_2of4.py --preset 7b
    python examples/benchmark_2of4.py --preset 7b --write-table my-gpu.json
    python examples/benchmark_2of4.py --model pruned-2of4/ --table my-gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse.kernels import DispatchTable, check_2of4_device, enable_2of4, table_for_device  # noqa: E402
from hf_sparse.kernels.dispatch import LLAMA_7B_SHAPES, LLAMA_70B_SHAPES  # noqa: E402
from hf_sparse.kernels.semi_structured import to_cusparselt  # noqa: E402
from hf_sparse.masks import select_n_m  # noqa: E402

PRESETS = {"7b": LLAMA_7B_SHAPES, "70b": LLAMA_70B_SHAPES + ((1024, 8192),)}
TOKENS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


def cuda_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def linear_table(shapes, dtype, margin: float) -> dict[tuple[int, int], int]:
    print(f"\n## 2:4 cuSPARSELt vs dense F.linear on {torch.cuda.get_device_name()} ({dtype})\n")
    print("| weight (out x in) | tokens | dense ms | sparse ms | dense / sparse |")
    print("|---|---|---|---|---|")
    thresholds = {}
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
        weight = weight * select_n_m(weight.abs(), 2, 4)
        sparse = to_cusparselt(weight)
        speedups = []
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
            dense_ms = cuda_ms(lambda: F.linear(x, weight))
            sparse_ms = cuda_ms(lambda: F.linear(x, sparse))
            speedups.append(dense_ms / sparse_ms)
            print(f"| {out_features} x {in_features} | {tokens} | {dense_ms:.4f} | {sparse_ms:.4f} "
                  f"| {dense_ms / sparse_ms:.2f}x |")
        # Sparse from the first count where it and every larger count beat dense by the margin.
        for index, tokens in enumerate(TOKENS):
            if all(s >= 1 + margin for s in speedups[index:]):
                thresholds[(out_features, in_features)] = tokens
                break
    return thresholds


@torch.no_grad()
def model_speed(path: str, table: DispatchTable | None, prefill_tokens: int, decode_tokens: int, dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), device="cuda")

    def prefill():
        return model(ids).logits

    def decode():
        return model.generate(ids[:, :16], max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                              do_sample=False)

    dense_logits = prefill()
    dense_prefill, dense_decode = cuda_ms(prefill, 2, 5), cuda_ms(decode, 1, 3)
    names = enable_2of4(model, table=table)
    sparse_logits = prefill()
    sparse_prefill, sparse_decode = cuda_ms(prefill, 2, 5), cuda_ms(decode, 1, 3)
    print(f"\n## {path}: {len(names)} linears on 2:4 kernels ({dtype})\n")
    print("| phase | dense | 2:4 | dense / 2:4 |")
    print("|---|---|---|---|")
    print(f"| prefill {prefill_tokens} tokens | {prefill_tokens / dense_prefill * 1e3:.0f} tok/s "
          f"| {prefill_tokens / sparse_prefill * 1e3:.0f} tok/s | {dense_prefill / sparse_prefill:.2f}x |")
    print(f"| decode {decode_tokens} tokens | {decode_tokens / dense_decode * 1e3:.1f} tok/s "
          f"| {decode_tokens / sparse_decode * 1e3:.1f} tok/s | {dense_decode / sparse_decode:.2f}x |")
    difference = (dense_logits.float() - sparse_logits.float()).abs().max().item()
    print(f"\nmax |logit difference| of the prefill, dense vs 2:4: {difference:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--margin", type=float, default=0.05, help="speed-up needed to dispatch sparse (0.05 = 5%)")
    parser.add_argument("--write-table", metavar="JSON", default=None)
    parser.add_argument("--model", default=None, help="a 2:4-pruned checkpoint for prefill/decode speed")
    parser.add_argument("--table", default=None, help="dispatch table JSON for --model (default: shipped for GPU)")
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_2of4 needs a CUDA GPU (compute capability >= 8.0 with cuSPARSELt); none found")
    try:
        check_2of4_device(torch.device("cuda"))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    dtype = getattr(torch, args.dtype)
    thresholds = linear_table(PRESETS[args.preset], dtype, args.margin)
    if args.write_table:
        name = torch.cuda.get_device_name()
        DispatchTable(name, thresholds, source=f"examples/benchmark_2of4.py --preset {args.preset} --dtype "
                                               f"{args.dtype} --margin {args.margin} on {name}").save(args.write_table)
        print(f"\nwrote {args.write_table}: {len(thresholds)} shapes dispatch sparse")
    if args.model:
        table = DispatchTable.load(args.table) if args.table else table_for_device(torch.cuda.get_device_name())
        model_speed(args.model, table, args.prefill_tokens, args.decode_tokens, dtype)


if __name__ == "__main__":
    main()
