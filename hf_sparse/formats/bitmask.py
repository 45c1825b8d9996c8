"""Bitmask storage: one bit per weight (kept or not) plus the kept values in row-major order.

At sparsity ``s`` in fp16 that is ``(1 - s) + 1/16`` of the dense bytes: 0.5625 at 50%, 0.3625 at 70%.
"""

from __future__ import annotations

import torch

from .bits import bit_view, decode_rows, nonzero_bits, pack_rows, row_chunks, unpack_rows


def bitmask_bytes(rows: int, cols: int, element_size: int, kept: int) -> int:
    """Stored bytes of a ``(rows, cols)`` matrix with ``kept`` non-zeros in bitmask form.

    >>> bitmask_bytes(10, 80, 2, 240) / (10 * 80 * 2)  # 70% sparse fp16
    0.3625
    """
    return kept * element_size + rows * -(-cols // 8)


def encode_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, bitmask)`` of a 2-D weight: its non-zeros (1-D, weight dtype, row-major, bit for bit) and a
    uint8 ``(rows, ceil(cols / 8))`` bitmask, most significant bit first.

    >>> values, mask = encode_bitmask(torch.tensor([[0., 2., 0., 3.], [1., 0., 0., 0.]]))
    >>> values.tolist(), mask.tolist()
    ([2.0, 3.0, 1.0], [[80], [128]])
    """
    rows, cols = weight.shape
    ints = bit_view(weight)
    values, masks = [], []
    for chunk in row_chunks(rows, cols):
        kept = nonzero_bits(ints[chunk], weight)
        values.append(ints[chunk][kept])
        masks.append(pack_rows(kept))
    flat = torch.cat(values) if values else ints.new_empty(0)
    packed = torch.cat(masks) if masks else torch.empty((0, 0), dtype=torch.uint8)
    return flat.view(weight.dtype), packed


def decode_bitmask(values: torch.Tensor, bitmask: torch.Tensor, cols: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(rows, cols)`` weight from :func:`encode_bitmask`'s output, bit for bit (then cast to ``dtype`` if
    given), decoded in row chunks so that nothing but the result is as large as the matrix."""
    rows = bitmask.shape[0]
    ints = bit_view(values)
    offset = 0

    def fill(chunk: slice, target: torch.Tensor) -> None:
        nonlocal offset
        kept = unpack_rows(bitmask[chunk], cols)
        count = int(kept.sum())
        if offset + count > ints.numel():
            raise ValueError(f"bitmask marks more weights than the {ints.numel()} stored values")
        target.masked_scatter_(kept, ints[offset:offset + count])
        offset += count

    dense = decode_rows(rows, cols, values.dtype, dtype, values.device, fill)
    if offset != ints.numel():
        raise ValueError(f"bitmask marks {offset} weights but {ints.numel()} values are stored")
    return dense
