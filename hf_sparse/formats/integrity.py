"""Integrity of compact checkpoints: every stored entry checked against the others, the record and the model before
anything is decoded, and a content hash per compressed weight.

A compressed weight ``P`` is a group of entries (``P.weight`` values, ``P.weight_positions`` or
``P.weight_bitmask``, ``P.weight_layout``). :func:`check_group` refuses a group whose entries do not fit each other
(dtypes, shapes, the layout's ``[rows, cols, n, m]``), the model (the parameter's shape) or the record (the N:M
pattern it claims for ``P``, the sparsity it lists), and whose positions or bitmask are not what the encoder writes
(positions out of range, repeated or out of order inside a group; padding bits set; more or fewer marked weights than
stored values). None of that needs the dense matrix: positions and bitmasks are read in row chunks.

:func:`group_hash` is the SHA-256 of a group's entries (suffix, dtype, shape and bytes of each, in suffix order).
``compress`` writes one per compressed weight into the record's ``storage`` entry (``"sha256": {P: hex}``);
loading and ``decompress`` recompute and compare them. A checkpoint written before hashes existed still loads, with
a warning that its content cannot be verified. The hash is a checksum against corruption and edits by accident, not a
signature: whoever can rewrite the weights can rewrite ``config.json`` too.

>>> import torch
>>> from hf_sparse.formats.compact import compress_weight
>>> parts = compress_weight(torch.tensor([[0., 1., 0., 2.] * 4] * 8), "2:4")
>>> check_group("lin", parts, pattern="2:4", sparsity=0.5, shape=(8, 16))
>>> parts["weight_positions"][0, 0] = 0  # positions 0, 0: a repeated position in the first group
>>> check_group("lin", parts)
Traceback (most recent call last):
...
ValueError: compact weight 'lin.weight': corrupt N:M positions in row 0 (a position repeated or out of order in a group of 4); the checkpoint is damaged or was edited
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import shown
from ..masks import SparsityPattern
from .bits import DECODE_CHUNK_ELEMENTS, nonzero_bits, bit_view, row_chunks, unpack_rows
from .n_m import position_bits, unpack_codes

logger = logging.getLogger(__name__)

VALUES, POSITIONS, BITMASK, LAYOUT = "weight", "weight_positions", "weight_bitmask", "weight_layout"
HASH_KEY = "sha256"
DAMAGED = "the checkpoint is damaged or was edited"


def _fail(prefix: str, text: str) -> ValueError:
    return ValueError(f"compact weight {shown(prefix + '.' + VALUES)}: {text}; {DAMAGED}")


def group_hash(parts: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of one compressed weight's entries: suffix, dtype, shape and bytes of each, in suffix order.

    >>> group_hash({"weight": torch.zeros(2, dtype=torch.float16)})[:12]
    'c2bf0739d871'
    """
    digest = hashlib.sha256()
    for suffix in sorted(parts):
        tensor = parts[suffix].detach().contiguous().cpu()
        digest.update(f"{suffix}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        if tensor.numel():  # the bytes as stored, hashed in place (no copy)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_layout(prefix: str, layout: torch.Tensor) -> tuple[int, int, int, int]:
    """``(rows, cols, n, m)`` of a layout entry, refusing any other dtype, shape or value."""
    if layout.dtype != torch.int64 or tuple(layout.shape) != (4,):
        raise _fail(prefix, f"{LAYOUT} must be int64 [rows, cols, n, m], got {layout.dtype} of shape "
                            f"{tuple(layout.shape)}")
    rows, cols, n, m = (int(v) for v in layout.tolist())
    if rows < 1 or cols < 1 or rows * cols > 1 << 40:
        raise _fail(prefix, f"{LAYOUT} has {rows} rows and {cols} columns; both must be positive")
    if (n, m) != (0, 0) and not (0 < n < m <= 1 << 16 and cols % m == 0):
        raise _fail(prefix, f"{LAYOUT} [{rows}, {cols}, {n}, {m}] is not a valid N:M layout (0 < n < m, m divides "
                            "cols) nor a bitmask one (n = m = 0)")
    return rows, cols, n, m


def _check_positions(prefix: str, positions: torch.Tensor, rows: int, groups: int, n: int, m: int) -> None:
    bits = position_bits(m)
    width = -(-groups * n * bits // 8)
    if positions.dtype != torch.uint8 or tuple(positions.shape) != (rows, width):
        raise _fail(prefix, f"{POSITIONS} must be uint8 of shape ({rows}, {width}) for a {n}:{m} layout, got "
                            f"{positions.dtype} of shape {tuple(positions.shape)}")
    for chunk in row_chunks(rows, groups * m, DECODE_CHUNK_ELEMENTS):
        codes = unpack_codes(positions[chunk], groups * n, bits).reshape(-1, groups, n)
        bad = (codes >= m).any(-1).any(-1)
        if n > 1:
            bad |= (codes[..., 1:] <= codes[..., :-1]).any(-1).any(-1)
        if bool(bad.any()):
            row = chunk.start + int(bad.nonzero()[0, 0])
            raise _fail(prefix, f"corrupt N:M positions in row {row} (a position repeated or out of order in a group "
                                f"of {m}, or one >= {m})" if bool((codes >= m).any()) else
                        f"corrupt N:M positions in row {row} (a position repeated or out of order in a group of {m})")
        # bits past the last code of a row are padding the encoder leaves zero
        used = groups * n * bits
        if used % 8:
            tail = positions[chunk][:, -1] & ((1 << (8 - used % 8)) - 1)
            if bool(tail.any()):
                raise _fail(prefix, f"{POSITIONS} has padding bits set after the last position of a row")


def _check_bitmask(prefix: str, bitmask: torch.Tensor, values: torch.Tensor, rows: int, cols: int,
                   pattern: SparsityPattern | None) -> int:
    """The number of weights the bitmask marks (after checking shape, padding and, for an N:M pattern, groups)."""
    width = -(-cols // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, width):
        raise _fail(prefix, f"{BITMASK} must be uint8 of shape ({rows}, {width}), got {bitmask.dtype} of shape "
                            f"{tuple(bitmask.shape)}")
    if values.dim() != 1:
        raise _fail(prefix, f"bitmask values must be 1-D, got shape {tuple(values.shape)}")
    marked = 0
    for chunk in row_chunks(rows, cols, DECODE_CHUNK_ELEMENTS):
        bits = unpack_rows(bitmask[chunk], width * 8)
        if bool(bits[:, cols:].any()):
            raise _fail(prefix, f"{BITMASK} has padding bits set after column {cols}")
        kept = bits[:, :cols]
        marked += int(kept.sum())
        if pattern is not None and pattern.is_n_m and cols % pattern.m == 0 and \
                bool((kept.reshape(-1, cols // pattern.m, pattern.m).sum(-1) > pattern.n).any()):
            raise _fail(prefix, f"its bitmask keeps more than {pattern.n} weights in a group of {pattern.m}, but the "
                                f"record says the module was pruned {pattern}")
    if marked != values.numel():
        raise _fail(prefix, f"{BITMASK} marks {marked} weights but {values.numel()} values are stored")
    return marked


def _nonzero_values(values: torch.Tensor) -> int:
    flat = values.reshape(-1)
    ints = bit_view(flat)
    step = DECODE_CHUNK_ELEMENTS
    return sum(int(nonzero_bits(ints[i:i + step], flat).sum()) for i in range(0, flat.numel(), step))


def check_group(prefix: str, parts: Mapping[str, torch.Tensor], pattern: SparsityPattern | str | None = None,
                sparsity: float | None = None, shape: tuple[int, ...] | None = None,
                expected_hash: str | None = None) -> None:
    """Refuse a compressed weight whose entries do not fit each other, ``shape`` (the model parameter's),
    ``pattern`` and ``sparsity`` (the record's for this module) or ``expected_hash``; raises ``ValueError`` naming
    the weight. A dense entry (no layout) is only checked against ``shape``."""
    unknown = sorted(set(parts) - {VALUES, POSITIONS, BITMASK, LAYOUT})
    if unknown:
        raise _fail(prefix, f"unknown entries {shown(unknown)}")
    if VALUES not in parts:
        raise _fail(prefix, f"entries {sorted(parts)} without the {VALUES!r} values")
    values = parts[VALUES]
    if LAYOUT not in parts:
        if POSITIONS in parts or BITMASK in parts:
            raise _fail(prefix, f"{sorted(parts)} has no {LAYOUT!r}")
        if shape is not None and tuple(values.shape) != tuple(shape):
            raise _fail(prefix, f"stored shape {tuple(values.shape)} differs from the model's {tuple(shape)}")
        return
    if (POSITIONS in parts) == (BITMASK in parts):
        raise _fail(prefix, f"a compact weight needs exactly one of {POSITIONS!r} or {BITMASK!r} beside {LAYOUT!r}, "
                            f"got {sorted(parts)}")
    if not values.is_floating_point():
        raise _fail(prefix, f"stored values have dtype {values.dtype}; a pruned weight stores floating-point values")
    rows, cols, n, m = read_layout(prefix, parts[LAYOUT])
    if shape is not None and (rows, cols) != tuple(shape):
        raise _fail(prefix, f"{LAYOUT} says ({rows}, {cols}) but the model's weight is {tuple(shape)}")
    pattern = SparsityPattern.parse(pattern) if pattern is not None else None
    if POSITIONS in parts:
        if (n, m) == (0, 0):
            raise _fail(prefix, f"{POSITIONS} beside a bitmask {LAYOUT} [{rows}, {cols}, 0, 0]")
        if pattern is not None and (not pattern.is_n_m or (pattern.n, pattern.m) != (n, m)):
            raise _fail(prefix, f"{LAYOUT} says {n}:{m} but the record says the module was pruned {pattern}")
        if tuple(values.shape) != (rows, cols // m * n):
            raise _fail(prefix, f"N:M values of shape {tuple(values.shape)} do not fit a ({rows}, {cols}) {n}:{m} "
                                "matrix")
    elif (n, m) != (0, 0):
        raise _fail(prefix, f"{BITMASK} beside an N:M {LAYOUT} [{rows}, {cols}, {n}, {m}]")
    # The bit-level checks read every position or mask bit. Entries whose hash matches are byte for byte what the
    # encoder wrote, so they only run without a hash, or on a mismatch (to name what is wrong before the hash does);
    # a bitmask under an N:M record is always read (the record, not the hash, makes that claim).
    actual = group_hash(parts) if expected_hash is not None else None
    if actual is None or actual != expected_hash or (BITMASK in parts and pattern is not None and pattern.is_n_m):
        if POSITIONS in parts:
            _check_positions(prefix, parts[POSITIONS], rows, cols // m, n, m)
        else:
            _check_bitmask(prefix, parts[BITMASK], values, rows, cols, pattern)
    if sparsity is not None:
        kept = _nonzero_values(values)
        achieved = 1.0 - kept / (rows * cols)
        if not math.isclose(achieved, sparsity, abs_tol=1.0 / (rows * cols) + 1e-9):
            raise _fail(prefix, f"it holds sparsity {achieved:.6f} but the record says {sparsity:.6f}")
    if actual is not None and actual != expected_hash:
        raise _fail(prefix, f"content hash {actual[:12]}… differs from the {expected_hash[:12]}… recorded when "
                            "it was compressed")


def expected_hashes(storage: Mapping[str, Any] | None, where: str) -> dict[str, str] | None:
    """The recorded hashes of a compact checkpoint's ``storage`` entry, or ``None`` (with a warning) for a checkpoint
    written before hashes existed."""
    hashes = (storage or {}).get(HASH_KEY)
    if hashes is None:
        logger.warning("%s is a compact checkpoint without content hashes (written by an older hf_sparse): its "
                       "entries are checked for consistency but their content cannot be verified; compress it again "
                       "from a dense copy to add them", where)
        return None
    return dict(hashes)


def check_hash_coverage(hashes: Mapping[str, str] | None, groups: set[str]) -> None:
    """Every compressed weight has a hash and every hash a compressed weight (a group replaced by a dense tensor, or
    a hash list edited, is refused)."""
    if hashes is None:
        return
    missing = sorted(groups - set(hashes))
    if missing:
        raise ValueError(f"compact weight {shown(missing[0] + '.' + VALUES)} has no content hash in the record's "
                         f"storage.{HASH_KEY} ({len(missing)} such); {DAMAGED}")
    extra = sorted(set(hashes) - groups)
    if extra:
        raise ValueError(f"the record's storage.{HASH_KEY} lists {shown(extra[0])}, which the checkpoint does not "
                         f"store in compact form ({len(extra)} such); {DAMAGED}")


__all__ = ["HASH_KEY", "check_group", "check_hash_coverage", "expected_hashes", "group_hash",
           "read_layout"]
