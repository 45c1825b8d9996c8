"""N:M storage: the N kept values of every group of M inputs, plus their positions in ceil(log2 M) bits each.

For 2:4 that is half the values and 2 bits per kept value: ``0.5 + 1/16 = 0.5625`` of the fp16 bytes. A group with
fewer than N non-zeros stores zeros at its lowest free positions, so every matrix that satisfies the pattern encodes.
"""

from __future__ import annotations

import torch

from .bits import bit_view, decode_rows, is_kept, nonzero_bits, pack_rows, row_chunks, unpack_rows


def position_bits(m: int) -> int:
    """Bits per stored position in a group of ``m``.

    >>> position_bits(4), position_bits(8), position_bits(2)
    (2, 3, 1)
    """
    return max(1, (m - 1).bit_length())


def n_m_bytes(rows: int, cols: int, element_size: int, n: int, m: int) -> int:
    """Stored bytes of a ``(rows, cols)`` matrix in N:M form (values + positions).

    >>> n_m_bytes(16, 64, 2, 2, 4) / (16 * 64 * 2)
    0.5625
    """
    kept_per_row = cols // m * n
    return rows * kept_per_row * element_size + rows * -(-kept_per_row * position_bits(m) // 8)


def fits_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether no group of ``m`` inputs holds more than ``n`` non-zeros (``(out, in)`` weight)."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return all(
        bool((is_kept(weight[chunk]).reshape(-1, cols // m, m).sum(-1) <= n).all())
        for chunk in row_chunks(rows, cols)
    )


def encode_n_m(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, positions)`` of a 2-D weight that fits N:M (check with :func:`fits_n_m` first).

    ``values``: ``(rows, cols / m * n)`` in the weight's dtype; ``positions``: uint8, one byte-aligned bit row per
    weight row, each position ``position_bits(m)`` bits, most significant first.

    >>> values, positions = encode_n_m(torch.tensor([[0., 5., 0., 7.]]), 2, 4)
    >>> values.tolist(), positions.tolist()  # positions 1 and 3 -> bits 01 11
    ([[5.0, 7.0]], [[112]])
    """
    rows, cols = weight.shape
    groups, bits = cols // m, position_bits(m)
    shifts = torch.arange(bits - 1, -1, -1, device=weight.device)
    ints = bit_view(weight)
    values = torch.empty((rows, groups * n), dtype=ints.dtype, device=weight.device)
    positions = []
    for chunk in row_chunks(rows, cols):
        block = ints[chunk].reshape(-1, groups, m)
        # Kept elements first (in input order), then the group's zeros: the first n are the positions to store.
        order = torch.argsort((~nonzero_bits(block, weight)).to(torch.uint8), dim=-1, stable=True)[..., :n]
        chosen = order.sort(dim=-1).values  # (r, groups, n), ascending inside each group
        values[chunk] = torch.gather(block, -1, chosen).reshape(-1, groups * n)
        code_bits = (chosen.unsqueeze(-1) >> shifts) & 1  # (r, groups, n, bits)
        positions.append(pack_rows(code_bits.reshape(chosen.shape[0], -1).bool()))
    return values.view(weight.dtype), torch.cat(positions) if positions else torch.empty((0, 0), dtype=torch.uint8)


def decode_n_m(values: torch.Tensor, positions: torch.Tensor, cols: int, n: int, m: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(rows, cols)`` weight from :func:`encode_n_m`'s output, bit for bit (then cast to ``dtype`` if
    given), decoded in row chunks so that nothing but the result is as large as the matrix."""
    rows = values.shape[0]
    groups, bits = cols // m, position_bits(m)
    if values.shape != (rows, groups * n):
        raise ValueError(f"N:M values of shape {tuple(values.shape)} do not fit a ({rows}, {cols}) {n}:{m} matrix")
    ints = bit_view(values)

    def fill(chunk: slice, target: torch.Tensor) -> None:
        codes = unpack_codes(positions[chunk], groups * n, bits).reshape(-1, groups, n)  # int64, 4 B per weight
        if codes.numel() and int(codes.max()) >= m:
            raise ValueError(f"corrupt N:M positions: a position >= {m} in rows {chunk.start}..{chunk.stop - 1}")
        target.view(-1, groups, m).scatter_(-1, codes, ints[chunk].reshape(-1, groups, n))

    return decode_rows(rows, cols, values.dtype, dtype, values.device, fill)


def unpack_codes(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit codes of each byte-aligned row of ``packed``, as int64 ``(rows, count)``.

    >>> unpack_codes(torch.tensor([[0b01110010]], dtype=torch.uint8), 4, 2).tolist()
    [[1, 3, 0, 2]]
    """
    rows = packed.shape[0]
    if 8 % bits == 0:  # 1, 2 or 4 bits: whole codes per byte, read with shifts (the common 2:4 case, fast)
        shifts = torch.arange(8 - bits, -1, -bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, -1)[:, :count].long()
    weights = torch.tensor([1 << (bits - 1 - i) for i in range(bits)], device=packed.device)
    return (unpack_rows(packed, count * bits).reshape(rows, count, bits).long() * weights).sum(-1)
