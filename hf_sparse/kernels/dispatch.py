"""When to run a 2:4 linear on sparse tensor cores: a table of measured (shape, token count) cases, dense otherwise.

2:4 sparse matmuls are not faster everywhere. Measured on an H100 80 GB (issue 16), cuSPARSELt alone was 1.2-1.55x
faster than dense on LLaMA-7B/70B linear shapes at >= 4096 tokens, about 1.0x at <= 256 tokens and 0.3-0.7x for
4096x4096 below 1024 tokens; PyTorch's default CUTLASS path was 0.03-0.4x of dense at <= 1024 tokens, and decode was
reported slower than dense elsewhere. So the rule is "sparse only where a measurement said faster": a shape that is
not in the table, a token count below its threshold, and every GPU without a table run dense. Tables for other GPUs
come from ``examples/benchmark_2of4.py --write-table``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (out_features, in_features) of nn.Linear weights. LLaMA-7B: hidden 4096, MLP 11008. LLaMA-70B: hidden 8192,
# MLP 28672 (its 1024x8192 key/value projections are left out: the statement does not single them out as measured).
LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
LLAMA_70B_SHAPES = ((8192, 8192), (28672, 8192), (8192, 28672))


@dataclass(frozen=True)
class DispatchTable:
    """Per weight shape, the token count from which the sparse kernel was measured faster than dense.

    >>> table = DispatchTable("H100", {(4096, 4096): 4096})
    >>> table.use_sparse(4096, 4096, 8192), table.use_sparse(4096, 4096, 1024), table.use_sparse(512, 4096, 8192)
    (True, False, False)
    """

    device: str  # matched as a substring of torch.cuda.get_device_name(), e.g. "H100"
    min_tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        for shape, tokens in self.min_tokens.items():
            if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ValueError(f"dispatch table shape {shape!r} must be (out_features, in_features) positive ints")
            if not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"dispatch table entry {shape}: min_tokens {tokens!r} must be a positive int")

    def use_sparse(self, out_features: int, in_features: int, tokens: int) -> bool:
        """Whether ``tokens`` rows through an ``(out_features, in_features)`` weight go to the sparse kernel."""
        threshold = self.min_tokens.get((out_features, in_features))
        return threshold is not None and tokens >= threshold

    def matches(self, device_name: str) -> bool:
        return self.device.lower() in device_name.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "source": self.source,
                "min_tokens": [[out, inp, tokens] for (out, inp), tokens in sorted(self.min_tokens.items())]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DispatchTable:
        if not isinstance(data, dict) or not isinstance(data.get("device"), str):
            raise ValueError(f"a dispatch table is an object with a 'device' string, got {data!r}")
        try:
            entries = {(int(out), int(inp)): int(tokens) for out, inp, tokens in data.get("min_tokens", [])}
        except (TypeError, ValueError):
            raise ValueError(f"dispatch table min_tokens must be [out, in, tokens] triples, got "
                             f"{data.get('min_tokens')!r}") from None
        return cls(data["device"], entries, str(data.get("source", "")))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DispatchTable:
        """A table written by ``examples/benchmark_2of4.py --write-table``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


H100_TABLE = DispatchTable(
    device="H100",
    min_tokens={shape: 4096 for shape in LLAMA_7B_SHAPES + LLAMA_70B_SHAPES},
    source="issue 16: cuSPARSELt 2:4 matmul alone 1.2-1.55x dense at >= 4096 tokens (H100 80 GB); below that "
           "dense (about 1.0x at <= 256 tokens, 0.3-0.7x for 4096x4096 below 1024, 1024-4096 not measured)",
)

MEASURED_TABLES = (H100_TABLE,)


def table_for_device(device_name: str) -> DispatchTable | None:
    """The shipped measured table for a GPU name, or ``None`` (then everything would run dense).

    >>> table_for_device("NVIDIA H100 80GB HBM3").device, table_for_device("NVIDIA A100-SXM4-80GB")
    ('H100', None)
    """
    return next((table for table in MEASURED_TABLES if table.matches(device_name)), None)
