"""Speed and memory of generation: prefill and decode throughput, time to first token, peak memory, checkpoint size.

Every speed claim is a ratio measured side by side: :func:`compare` runs the models of one comparison in the same
process, *alternately* (model A run 1, model B run 1, model A run 2, ...), after warm-up runs, and reports medians,
so a neighbour's burst of load on a shared machine hits both sides instead of skewing the ratio.

One run: a fixed random prompt of ``prompt_length`` tokens (seeded, the same for every model of the same vocabulary)
goes through one forward pass with the KV cache on (prefill; time to first token is that pass plus the choice of the
first token), then ``new_tokens`` greedy steps of one token each reuse the cache (decode). The decode loop never stops
early at an end-of-text token, so every run generates exactly the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclasses.dataclass
class BenchResult:
    """Medians over the measured runs of one model (times in seconds, memory in bytes)."""

    name: str
    prompt_length: int
    new_tokens: int
    batch_size: int
    runs: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    peak_memory_bytes: int | None
    weights_bytes: int
    checkpoint_bytes: int | None
    prefill_s: list[float] = dataclasses.field(default_factory=list)  # every measured run, in order
    decode_s: list[float] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def checkpoint_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ...) in a checkpoint folder; ``None`` if not local.

    >>> checkpoint_bytes("/no/such/folder") is None
    True
    """
    if path is None:
        return None
    folder = Path(path).expanduser()
    if folder.is_file():
        return folder.stat().st_size
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel()) if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


class _PeakMemory:
    """Peak memory during a ``with`` block: CUDA's allocator peak on a GPU; on CPU the model's weights plus the rise of
    the process's resident set above its level at the start (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
    so that other models held by the same process do not count. ``value`` is ``None`` where neither is available."""

    def __init__(self, device: torch.device, weights: int):
        self.device, self.weights, self.value = device, weights, None

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._reset_ok = False
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS to the current RSS
            self._reset_ok = True
        except OSError:
            pass
        self._start = self._status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.value = int(torch.cuda.max_memory_allocated(self.device))
        elif self._reset_ok and self._start is not None:
            peak = self._status_kib("VmHWM")
            if peak is not None:
                self.value = self.weights + max(0, peak - self._start) * 1024
        return False


def _input_device(model: nn.Module) -> torch.device:
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_kwargs(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The name of the KV-cache argument of ``model.forward`` (``cache`` in recent transformers, ``past_key_values``
    before) and ``logits_to_keep=1`` where supported: generation computes logits of the last position only."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    return cache_name, ({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


@torch.no_grad()
def _one_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, time to first token, decode seconds) of one greedy generation."""
    device = prompt.device
    cache_name, extra = _forward_kwargs(model)

    def cache_of(output):
        cache = getattr(output, "cache", None)
        return output.past_key_values if cache is None else cache

    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **extra)
    _sync(device)
    prefill = time.perf_counter() - start
    next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (batch, 1)
    _sync(device)
    first_token = time.perf_counter() - start
    cache = cache_of(out)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_token, use_cache=True, **{cache_name: cache}, **extra)
        cache = cache_of(out)
        next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    return prefill, first_token, time.perf_counter() - start


def compare(models: Mapping[str, nn.Module], prompt_length: int = 512, new_tokens: int = 64, runs: int = 5,
            warmup: int = 1, batch_size: int = 1, checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
            seed: int = 0, show_progress: bool = True) -> list[BenchResult]:
    """Benchmark ``models`` (name -> model) alternately in this process; one :class:`BenchResult` per model, in order.

    ``checkpoints`` (name -> folder) adds the size of each model's weight files. Ratios between the results hold on a
    loaded machine because every round measures each model once, back to back.

    >>> dense, sparse = compare({"dense": dense_model, "2:4": pruned_model}, prompt_length=256)  # doctest: +SKIP
    >>> sparse.decode_tokens_per_s / dense.decode_tokens_per_s  # doctest: +SKIP
    1.02
    """
    if not models:
        raise ValueError("models is empty; give at least one name -> model")
    for label, value in (("prompt_length", prompt_length), ("new_tokens", new_tokens), ("runs", runs),
                         ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    checkpoints = dict(checkpoints or {})
    prompts, states = {}, {}
    for name, model in models.items():
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and prompt_length + new_tokens > context:
            raise ValueError(f"prompt_length + new_tokens = {prompt_length + new_tokens} exceeds the context of "
                             f"{name!r} ({context} tokens); allowed: at most {context} in total")
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(seed)  # same seed -> the same prompt for equal vocabularies
        prompts[name] = torch.randint(0, vocab, (batch_size, prompt_length), generator=generator).to(
            _input_device(model))
        states[name] = model.training
        model.eval()
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    peaks: dict[str, list[int]] = {name: [] for name in models}
    sizes = {name: weights_bytes(model) for name, model in models.items()}
    rounds = warmup + runs
    bar = tqdm(total=rounds * len(models), desc="bench", unit="run", disable=not show_progress)
    try:
        for round_index in range(rounds):
            for name, model in models.items():
                bar.set_postfix_str(f"{name}, {'warm-up' if round_index < warmup else f'run {round_index - warmup + 1}/{runs}'}")
                with _PeakMemory(prompts[name].device, sizes[name]) as peak:
                    measured = _one_run(model, prompts[name], new_tokens)
                if round_index >= warmup:
                    times[name].append(measured)
                    if peak.value is not None:
                        peaks[name].append(peak.value)
                bar.update()
    finally:
        bar.close()
        for name, model in models.items():
            model.train(states[name])
    results = []
    for name in models:
        prefill = [t[0] for t in times[name]]
        first = [t[1] for t in times[name]]
        decode = [t[2] for t in times[name]]
        results.append(BenchResult(
            name=name, prompt_length=prompt_length, new_tokens=new_tokens, batch_size=batch_size, runs=runs,
            prefill_tokens_per_s=batch_size * prompt_length / statistics.median(prefill),
            decode_tokens_per_s=batch_size * new_tokens / statistics.median(decode),
            time_to_first_token_s=statistics.median(first),
            peak_memory_bytes=max(peaks[name]) if peaks[name] else None, weights_bytes=sizes[name],
            checkpoint_bytes=checkpoint_bytes(checkpoints.get(name)), prefill_s=prefill, decode_s=decode,
        ))
        logger.info("%s: prefill %.0f tok/s, decode %.1f tok/s, first token %.3f s", name,
                    results[-1].prefill_tokens_per_s, results[-1].decode_tokens_per_s,
                    results[-1].time_to_first_token_s)
    return results


def benchmark(model: nn.Module, name: str = "model", checkpoint: str | os.PathLike | None = None,
              **kwargs: Any) -> BenchResult:
    """:func:`compare` for one model. Keyword arguments as for :func:`compare`.

    >>> benchmark(model, prompt_length=128, new_tokens=16, runs=3).decode_tokens_per_s  # doctest: +SKIP
    812.4
    """
    return compare({name: model}, checkpoints={name: checkpoint}, **kwargs)[0]


# Rows of the printed table: (label, BenchResult field, how to format, whether higher is better).
TABLE_ROWS = (
    ("prefill tokens/s", "prefill_tokens_per_s", "{:,.0f}", True),
    ("decode tokens/s", "decode_tokens_per_s", "{:,.1f}", True),
    ("time to first token", "time_to_first_token_s", "{:.4f} s", False),
    ("peak memory", "peak_memory_bytes", None, False),
    ("weights in memory", "weights_bytes", None, False),
    ("checkpoint size", "checkpoint_bytes", None, False),
)


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; ``None`` -> ``'-'``.

    >>> format_bytes(27 * 2**20), format_bytes(None)
    ('27.0 MiB', '-')
    """
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def ratios(result: BenchResult, baseline: BenchResult) -> dict[str, float | None]:
    """``result / baseline`` for every table row (``None`` where either side is unknown)."""
    out = {}
    for _label, field, _fmt, _higher in TABLE_ROWS:
        a, b = getattr(result, field), getattr(baseline, field)
        out[field] = a / b if a is not None and b else None
    return out


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table, one column per model (and ``first / last`` ratio when there are two).

    >>> r = BenchResult("a", 8, 4, 1, 1, 100.0, 10.0, 0.08, None, 2048, None)
    >>> print(format_table([r]))
    | | a |
    |---|---|
    | prefill tokens/s | 100 |
    | decode tokens/s | 10.0 |
    | time to first token | 0.0800 s |
    | peak memory | - |
    | weights in memory | 2.0 KiB |
    | checkpoint size | - |
    """
    names = [r.name for r in results]
    with_ratio = len(results) == 2
    header = "| | " + " | ".join(names) + (f" | {names[0]} / {names[1]} |" if with_ratio else " |")
    lines = [header, "|" + "---|" * (len(names) + 1 + with_ratio)]
    ratio = ratios(results[0], results[1]) if with_ratio else {}
    for label, field, fmt, _higher in TABLE_ROWS:
        cells = []
        for r in results:
            value = getattr(r, field)
            cells.append(format_bytes(value) if fmt is None else ("-" if value is None else fmt.format(value)))
        if with_ratio:
            cells.append("-" if ratio[field] is None else f"{ratio[field]:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
