"""Bit-level helpers shared by the compact encodings: exact bit views of any dtype, row-wise bit packing, row chunks.

Every encoding works on the *integer view* of a weight (same element size, same bits), so every stored value comes
back bit for bit in any dtype: NaN payloads survive, float8 needs no arithmetic kernels.

A pruned weight is a zero of either sign: masks applied by multiplication leave ``-0.0`` wherever the original
weight was negative, half of all pruned weights. Storing those signs would cost a bit per weight and buy nothing
(``-0.0 == 0.0``; a product with either is a zero), so pruned positions decode as ``+0.0``. The one exception to
"bit for bit" is therefore ``-0.0`` -> ``+0.0`` at pruned positions; ``torch.equal`` holds for every tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..masks import pack_mask, unpack_mask

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Row chunks hold at most this many weights, so the int64 indices and unpacked bits of a chunk stay far below the
# size of the matrix itself.
CHUNK_ELEMENTS = 1 << 22
# Decoding runs while a model loads, so its chunks are smaller: the work tensors of one chunk (int64 positions of an
# N:M chunk, 4 bytes per weight; masked_scatter's int64 prefix sums of a bitmask chunk; bits; a cast chunk) stay at a
# few MiB whatever the matrix size (2.7 MiB at most counted, README "Compact checkpoints"), and the loader's peak is
# the model plus one decompressed matrix plus that.
DECODE_CHUNK_ELEMENTS = 1 << 18


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


def _has_signed_zero(dtype: torch.dtype) -> bool:
    """Whether the top bit of ``dtype`` makes a ``-0.0`` (not in the ``fnuz`` float8 types, where it is their NaN)."""
    return dtype.is_floating_point and not str(dtype).endswith("fnuz")


def nonzero_bits(ints: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``True`` where the integer view ``ints`` of a tensor of ``like``'s dtype holds a non-zero value (``-0.0`` and
    ``+0.0`` are both zero).

    >>> w = torch.tensor([-0.0, 0.0, -2.0])
    >>> nonzero_bits(bit_view(w), w).tolist()
    [False, False, True]
    """
    if not _has_signed_zero(like.dtype):
        return ints != 0
    # -0.0 is the sign bit alone: 0x80 in the uint8 view of float8, the minimum of the signed views otherwise.
    negative_zero = 0x80 if ints.dtype == torch.uint8 else torch.iinfo(ints.dtype).min
    return (ints != 0) & (ints != negative_zero)


def is_kept(tensor: torch.Tensor) -> torch.Tensor:
    """``True`` where ``tensor`` is not a zero of either sign (compare with the keep-masks of :mod:`hf_sparse.masks`)."""
    return nonzero_bits(bit_view(tensor), tensor)


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


def row_chunks(rows: int, cols: int, limit: int | None = None) -> Iterator[slice]:
    """Slices of whole rows with at most ``limit`` (default :data:`CHUNK_ELEMENTS`) weights each (at least one row).

    >>> list(row_chunks(3, 1 << 21))
    [slice(0, 2, None), slice(2, 3, None)]
    """
    step = max(1, (CHUNK_ELEMENTS if limit is None else limit) // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def decode_rows(rows: int, cols: int, stored: torch.dtype, dtype: torch.dtype | None, device: torch.device,
                fill: Callable[[slice, torch.Tensor], None]) -> torch.Tensor:
    """The dense ``(rows, cols)`` matrix in ``dtype`` (default ``stored``), built chunk by chunk.

    ``fill(chunk, target)`` writes the integer view (``stored``'s width) of the decoded rows ``chunk`` into
    ``target``, a zero tensor of shape ``(len(chunk), cols)``. When ``dtype`` is ``stored``, ``target`` is a view of
    the result itself; otherwise it is a scratch chunk cast into the result. Either way the only full-size tensor
    allocated is the result: a cast never makes a second copy of the matrix.

    >>> def fill(chunk, target):
    ...     target.fill_(bit_view(torch.tensor([1.5], dtype=torch.float16)).item())
    >>> decode_rows(2, 3, torch.float16, torch.float32, torch.device("cpu"), fill).tolist()
    [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]]
    """
    dtype = stored if dtype is None else dtype
    dense = torch.zeros((rows, cols), dtype=dtype, device=device)
    int_dtype = _INT_VIEW[torch.empty((), dtype=stored).element_size()]
    for chunk in row_chunks(rows, cols, DECODE_CHUNK_ELEMENTS):
        if dtype == stored:
            fill(chunk, dense[chunk].view(int_dtype))
        else:
            scratch = torch.zeros((chunk.stop - chunk.start, cols), dtype=int_dtype, device=device)
            fill(chunk, scratch)
            dense[chunk] = scratch.view(stored)  # copy_ casts
            del scratch
    return dense
