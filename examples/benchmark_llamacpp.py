"""Pruned models in the real llama.cpp: perplexity next to hf_sparse's, tokens/s next to the ideal, file sizes.

For each variant (``dense``, ``flap30`` = FLAP 30% with per-block widths, ``flap30-uniform`` = FLAP 30% with
``uniform_shapes``, ``shortgpt20`` = ShortGPT removing 20% of the blocks; any ``METHOD[-uniform]NN``), this script
prunes the model (calibration: ``--calibration-samples`` windows of ``--calibration-length`` tokens, seed 0), exports
it with :func:`hf_sparse.export_gguf` in every ``--outtypes`` type, and reports

* llama.cpp's perplexity (``llama-perplexity -c CONTEXT --chunks N``: each chunk of CONTEXT tokens scores its second
  half) next to the same computation in transformers on the same token ids (:func:`reference_perplexity`), and
  hf_sparse's own perplexity (every token of ``N`` non-overlapping windows, the number the other benchmarks report);
* prompt and generation tokens/s of every f32 file in one ``llama-bench`` run (the dense file among them), each as a
  ratio to dense, next to the ideal ratio: dense over pruned weights of the matrices a token passes through (the
  decoder blocks' linears and the output projection);
* the file sizes.

llama.cpp tokenizes the evaluation text without parsing special tokens, so a literal ``<unk>`` in WikiText is text
to it; the transformers side does the same (``split_special_tokens=True``), so both see one token stream.

The binaries are found in ``$HF_SPARSE_LLAMA_CPP_BIN`` (a folder holding ``llama-perplexity`` and ``llama-bench``),
else on ``PATH``; without them the script prints how to build them (:data:`BUILD_COMMAND`) and stops.

    python examples/benchmark_llamacpp.py                                   # SmolLM2 (the test-bed), four variants
    python examples/benchmark_llamacpp.py --model demo/llama-7m-books-fp16 --eval-text demo/heldout-slice.txt \\
        --calibration demo/calibration-slice.txt --chunks 8 --variants dense,flap30,shortgpt20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
ENV_VAR = "HF_SPARSE_LLAMA_CPP_BIN"
BUILD_COMMAND = ("pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36"
                 ".tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF "
                 "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF && cmake --build build --target llama-perplexity "
                 "llama-bench llama-tokenize && export HF_SPARSE_LLAMA_CPP_BIN=$PWD/build/bin")


def find_binary(name: str) -> Path | None:
    """``name`` in ``$HF_SPARSE_LLAMA_CPP_BIN``, else on ``PATH``; ``None`` when neither has it."""
    folder = os.environ.get(ENV_VAR)
    if folder:
        candidate = Path(folder).expanduser() / name
        return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None
    found = shutil.which(name)
    return Path(found) if found else None


def llamacpp_perplexity(binary: Path, gguf: Path, text: Path, context: int, chunks: int, threads: int = 1) -> float:
    """``llama-perplexity``'s final estimate for ``gguf`` on ``text``."""
    done = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text), "-c", str(context), "--chunks", str(chunks),
                           "-t", str(threads), "-b", str(max(context, 512))], capture_output=True, text=True)
    found = re.findall(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode or not found:
        raise RuntimeError(f"llama-perplexity failed on {gguf.name}: {(done.stderr or done.stdout)[-800:]}")
    return float(found[-1])


def llamacpp_logprobs(binary: Path, gguf: Path, text: Path, context: int, chunks: int = 1, threads: int = 1):
    """(token ids, log-probabilities) of llama.cpp's perplexity run: the ids of the first ``chunks`` chunks and, for
    each position of each chunk's second half but the last, the log-probabilities over the vocabulary (decoded from
    the ``--kl-divergence-base`` file: per position a scale and an offset, then one 16-bit step per token)."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="hf_sparse-kl-") as folder:
        base = Path(folder) / "base.bin"
        done = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text), "-c", str(context), "--chunks",
                               str(chunks), "-t", str(threads), "--kl-divergence-base", str(base)],
                              capture_output=True, text=True)
        if done.returncode or not base.is_file():
            raise RuntimeError(f"llama-perplexity failed on {gguf.name}: {done.stderr[-800:]}")
        data = base.read_bytes()
    if data[:8] != b"_logits_":
        raise RuntimeError("unexpected --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(data[8:20], np.int32))
    ids = np.frombuffer(data[20:20 + 4 * n_ctx * n_chunk], np.int32).reshape(n_chunk, n_ctx)
    stride = 2 * ((n_vocab + 1) // 2) + 4  # uint16 per position
    first = n_ctx // 2
    rows = np.frombuffer(data[20 + 4 * n_ctx * n_chunk:], np.uint16).reshape(n_chunk, n_ctx - 1 - first, stride)
    header = rows[..., :4].copy().view(np.float32)  # (chunks, positions, 2): scale, minimum log-probability
    return ids, header[..., 1:2] + header[..., 0:1] * rows[..., 4:4 + n_vocab]


def llamacpp_tokens(binary: Path, gguf: Path, text: str) -> list[int]:
    """``llama-tokenize``'s ids for ``text`` (special tokens parsed, as transformers does by default)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as handle:
        handle.write(text)
    try:
        done = subprocess.run([str(binary), "-m", str(gguf), "-f", handle.name, "--ids", "--log-disable"],
                              capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    if done.returncode:
        raise RuntimeError(f"llama-tokenize failed on {gguf.name}: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_perplexity(model, tokenizer, text: str, context: int, chunks: int) -> float:
    """What ``llama-perplexity -c context --chunks chunks`` computes, in transformers: the text tokenized without
    parsing special tokens (a BOS first if the tokenizer adds one, and as first token of every chunk), cut into
    chunks of ``context`` tokens, each scoring the tokens of its second half from everything before them."""
    import torch

    ids = tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None
    first = context // 2
    nll, count = 0.0, 0
    for index in range(min(chunks, len(ids) // context)):
        chunk = torch.tensor(ids[index * context:(index + 1) * context])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = model(chunk[None]).logits[0, first:context - 1].double()
        targets = chunk[first + 1:]
        nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


def matmul_weights(model) -> int:
    """Weights of the matrices one token passes through: the decoder blocks' linears and the output projection."""
    from torch import nn

    blocks = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".layers." in f".{name}")
    return blocks + model.get_output_embeddings().weight.numel()


def llama_bench(binary: Path, files: list[Path], threads: int, prompt: int, generate: int, repetitions: int
                ) -> dict[str, dict[str, float]]:
    """``{file name: {"pp": tokens/s, "tg": tokens/s}}`` from one ``llama-bench`` run over ``files``."""
    command = [str(binary), "-t", str(threads), "-p", str(prompt), "-n", str(generate), "-r", str(repetitions),
               "-o", "json"]
    for path in files:
        command += ["-m", str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed: {done.stderr[-800:]}")
    speeds: dict[str, dict[str, float]] = {}
    for row in json.loads(done.stdout):
        kind = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        speeds.setdefault(Path(row["model_filename"]).name, {})[kind] = float(row["avg_ts"])
    return speeds


def parse_variant(name: str) -> tuple[str, float | None, bool]:
    """``"flap30-uniform"`` -> ``("flap", 0.3, True)``; ``"dense"`` -> ``("dense", None, False)``."""
    if name == "dense":
        return "dense", None, False
    match = re.fullmatch(r"([a-z_]+?)(-uniform)?(\d+)|([a-z_]+?)(\d+)(-uniform)", name)
    if not match:
        raise SystemExit(f"variant {name!r} must look like dense, flap30, flap30-uniform or shortgpt20")
    method = match.group(1) or match.group(4)
    percent = match.group(3) or match.group(5)
    return method, int(percent) / 100, bool(match.group(2) or match.group(6))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparse
    from hf_sparse.evaluation import perplexity
    from hf_sparse import testbed
    from hf_sparse.saving import save_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test-bed)")
    parser.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext2-test.txt"))
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration.txt"))
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--variants", default="dense,flap30,flap30-uniform,shortgpt20")
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output", help="folder for the checkpoints and GGUF files (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    binaries = {name: find_binary(name) for name in ("llama-perplexity", "llama-bench")}
    if not all(binaries.values()):
        missing = [name for name, path in binaries.items() if path is None]
        print(f"llama.cpp binaries {missing} not found in ${ENV_VAR} or on PATH. Build them with:\n  {BUILD_COMMAND}")
        raise SystemExit(1)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else testbed.ensure_testbed()
    output = Path(args.output or tempfile.mkdtemp(prefix="hf_sparse-llamacpp-"))
    output.mkdir(parents=True, exist_ok=True)
    text = Path(args.eval_text).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outtypes = args.outtypes.split(",")
    rows, dense_weights = [], None
    for variant in args.variants.split(","):
        method, sparsity, uniform = parse_variant(variant)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if method != "dense":
            config = hf_sparse.SparsityConfig(
                method=method, pattern="structured", sparsity=sparsity, calibration=args.calibration,
                num_samples=args.calibration_samples, sequence_length=args.calibration_length, seed=0,
                method_options={"uniform_shapes": True} if uniform else {})
            hf_sparse.prune(model, config, tokenizer=tokenizer)
        weights = matmul_weights(model)
        dense_weights = dense_weights or weights
        folder = save_checkpoint(model, tokenizer, output / variant, overwrite=True)
        row = {"variant": variant, "weights": weights, "ideal": dense_weights / weights,
               "hf_sparse_ppl": perplexity(model, tokenizer, text, sequence_length=args.context,
                                           max_windows=args.chunks),
               "reference_ppl": reference_perplexity(model, tokenizer, text, args.context, args.chunks),
               "arch": hf_sparse.export.plan_export(model).arch, "files": {}}
        for outtype in outtypes:
            path = hf_sparse.export_gguf(folder, output / f"{variant}-{outtype}.gguf", outtype=outtype,
                                         overwrite=True)
            row["files"][outtype] = {"path": str(path), "bytes": path.stat().st_size,
                                     "llamacpp_ppl": llamacpp_perplexity(binaries["llama-perplexity"], path,
                                                                         Path(args.eval_text), args.context,
                                                                         args.chunks, args.threads)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    speed_type = "f32" if "f32" in outtypes else outtypes[0]
    speeds = llama_bench(binaries["llama-bench"], [Path(r["files"][speed_type]["path"]) for r in rows],
                         args.threads, args.prompt_tokens, args.gen_tokens, args.repetitions)
    dense_speed = speeds[Path(rows[0]["files"][speed_type]["path"]).name]
    print(f"\nperplexity, {args.chunks} chunks of {args.context} tokens (llama.cpp scores each chunk's second half; "
          f"'hf_sparse' = every token of {args.chunks} windows)")
    print("| variant | GGUF arch | hf_sparse | transformers, llama.cpp protocol | "
          + " | ".join(f"llama.cpp {t}" for t in outtypes) + " | f32 vs transformers |")
    print("|---|---|---|---|" + "---|" * len(outtypes) + "---|")
    for row in rows:
        f32 = row["files"].get("f32", {}).get("llamacpp_ppl")
        gap = f"{100 * (f32 / row['reference_ppl'] - 1):+.2f}%" if f32 else "-"
        print(f"| {row['variant']} | {row['arch']} | {row['hf_sparse_ppl']:.2f} | {row['reference_ppl']:.2f} | "
              + " | ".join(f"{row['files'][t]['llamacpp_ppl']:.2f}" for t in outtypes) + f" | {gap} |")
    print(f"\nllama-bench {speed_type}, {args.threads} thread(s), prompt {args.prompt_tokens}, generation "
          f"{args.gen_tokens}, {args.repetitions} repetitions")
    print("| variant | prompt tok/s | generation tok/s | prompt ratio | generation ratio | ideal ratio | "
          "generation / ideal | " + " | ".join(f"{t} file" for t in outtypes) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(outtypes))
    for row in rows:
        speed = speeds[Path(row["files"][speed_type]["path"]).name]
        row["speed"] = speed
        ratio_pp, ratio_tg = speed["pp"] / dense_speed["pp"], speed["tg"] / dense_speed["tg"]
        print(f"| {row['variant']} | {speed['pp']:.1f} | {speed['tg']:.1f} | {ratio_pp:.3f} | {ratio_tg:.3f} | "
              f"{row['ideal']:.3f} | {ratio_tg / row['ideal']:.3f} | "
              + " | ".join(f"{row['files'][t]['bytes'] / 2**20:.1f} MiB" for t in outtypes) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
