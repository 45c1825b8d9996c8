"""Bit-level helpers shared by the compact encodings: exact bit views of any dtype, row-wise bit packing, row chunks.

Every encoding works on the *integer view* of a weight (same element size, same bits), so a round trip is exact for
any dtype: ``-0.0`` stays ``-0.0``, NaN payloads survive, float8 needs no arithmetic kernels. "Zero" always means
"all bits zero"; a ``-0.0`` is a stored value like any other.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..masks import pack_mask, unpack_mask

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Row chunks hold at most this many weights, so the int64 indices and unpacked bits of a chunk stay far below the
# size of the matrix itself (the loader's peak is "one decompressed matrix", not several).
CHUNK_ELEMENTS = 1 << 22


def bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor of the same element size.

    >>> bit_view(torch.tensor([-0.0, 1.0], dtype=torch.float16)).tolist()
    [-32768, 15360]
    """
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"compact storage encodes real-valued weights, got dtype {tensor.dtype}")
    int_dtype = _INT_VIEW.get(tensor.element_size())
    if int_dtype is None:
        raise ValueError(f"no integer view for dtype {tensor.dtype} ({tensor.element_size()} bytes per element)")
    return tensor.view(int_dtype)


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``True`` where an element has any bit set (``-0.0`` counts as kept: it is not bit-identical to ``0``)."""
    return bit_view(tensor) != 0


def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """Pack a ``(rows, k)`` boolean tensor into ``(rows, ceil(k / 8))`` uint8, each row starting on a byte.

    >>> pack_rows(torch.tensor([[True, False, True], [False, False, True]])).tolist()
    [[160], [32]]
    """
    rows, k = bits.shape
    pad = (-k) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(rows, pad)], dim=1)
    return pack_mask(bits).reshape(rows, (k + pad) // 8)


def unpack_rows(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: the first ``k`` bits of each row as booleans."""
    rows, width = packed.shape
    return unpack_mask(packed, (rows, width * 8))[:, :k]


def row_chunks(rows: int, cols: int) -> Iterator[slice]:
    """Slices of whole rows with at most :data:`CHUNK_ELEMENTS` weights each (at least one row).

    >>> list(row_chunks(3, 1 << 21))
    [slice(0, 2, None), slice(2, 3, None)]
    """
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
