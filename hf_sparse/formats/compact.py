"""Compact storage of pruned weights: per matrix, the smallest of N:M, bitmask or dense, as safetensors entries.

A compressed linear ``P`` is stored as

* ``P.weight``: the kept values only (so its shape is *not* the layer's: a loader that does not know the format
  fails on the size mismatch instead of loading wrong weights),
* ``P.weight_positions`` (N:M, uint8) or ``P.weight_bitmask`` (unstructured, uint8),
* ``P.weight_layout``: int64 ``[rows, cols, n, m]`` (``n = m = 0`` for a bitmask), so every entry decodes on its own.

Everything else (embeddings, norms, ``lm_head``, biases, linears where dense is smaller) is stored as it was.
Decoding restores every non-zero bit for bit in any dtype; pruned zeros come back as ``+0.0`` (see
:mod:`hf_sparse.formats.bits` for why the sign of a pruned zero is not kept).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import shown
from ..masks import SparsityPattern
from .bitmask import bitmask_bytes, decode_bitmask, encode_bitmask
from .bits import is_kept, row_chunks
from .integrity import HASH_KEY, check_group, group_hash
from .n_m import decode_n_m, encode_n_m, fits_n_m, n_m_bytes

logger = logging.getLogger(__name__)

STORAGE_FORMAT = "hf_sparse_compact"
STORAGE_VERSION = 1

VALUES = "weight"
POSITIONS = "weight_positions"
BITMASK = "weight_bitmask"
LAYOUT = "weight_layout"
COMPANIONS = (POSITIONS, BITMASK, LAYOUT)

N_M, UNSTRUCTURED, DENSE = "n:m", "bitmask", "dense"
LAYOUT_BYTES = 4 * 8  # the int64 [rows, cols, n, m] entry beside every compressed weight


def count_kept(weight: torch.Tensor) -> int:
    rows, cols = weight.shape
    return sum(int(is_kept(weight[chunk]).sum()) for chunk in row_chunks(rows, cols))


def choose_encoding(weight: torch.Tensor, pattern: SparsityPattern | str | None = None) -> tuple[str, int]:
    """``(encoding, stored bytes)`` of the smallest form of a 2-D ``weight``: ``"n:m"`` (only if ``pattern`` is N:M
    and the weight fits it), ``"bitmask"`` or ``"dense"``. Ties go to N:M, then to dense (2:4 in N:M and bitmask form
    have the same size; N:M is the layout sparse kernels read).

    >>> w = torch.tensor([[0., 1., 0., 2.] * 4] * 8, dtype=torch.float16)
    >>> choose_encoding(w, "2:4"), choose_encoding(w), choose_encoding(torch.ones(8, 16))
    (('n:m', 144), ('bitmask', 144), ('dense', 512))
    """
    rows, cols = weight.shape
    size = weight.element_size()
    candidates = [(rows * cols * size, 1, DENSE)]
    pattern = SparsityPattern.parse(pattern) if pattern is not None else None
    if pattern is not None and pattern.is_n_m and fits_n_m(weight, pattern.n, pattern.m):
        candidates.append((n_m_bytes(rows, cols, size, pattern.n, pattern.m), 0, N_M))
    candidates.append((bitmask_bytes(rows, cols, size, count_kept(weight)), 2, UNSTRUCTURED))
    stored, _, encoding = min(candidates)
    return encoding, stored


def compress_weight(weight: torch.Tensor, pattern: SparsityPattern | str | None = None) -> dict[str, torch.Tensor]:
    """The entries (suffix -> tensor) that store ``weight`` in its smallest form; ``{"weight": weight}`` if dense.

    >>> parts = compress_weight(torch.tensor([[0., 1., 0., 2.] * 4] * 8), "2:4")
    >>> sorted(parts), tuple(parts["weight"].shape), parts["weight_layout"].tolist()
    (['weight', 'weight_layout', 'weight_positions'], (8, 8), [8, 16, 2, 4])
    """
    if weight.dim() != 2:
        raise ValueError(f"compact storage encodes 2-D weights, got shape {tuple(weight.shape)}")
    weight = weight.detach().contiguous()
    encoding, _ = choose_encoding(weight, pattern)
    rows, cols = weight.shape
    if encoding == N_M:
        pattern = SparsityPattern.parse(pattern)
        values, positions = encode_n_m(weight, pattern.n, pattern.m)
        layout = [rows, cols, pattern.n, pattern.m]
        return {VALUES: values, POSITIONS: positions, LAYOUT: torch.tensor(layout, dtype=torch.int64)}
    if encoding == UNSTRUCTURED:
        values, bitmask = encode_bitmask(weight)
        return {VALUES: values, BITMASK: bitmask, LAYOUT: torch.tensor([rows, cols, 0, 0], dtype=torch.int64)}
    return {VALUES: weight}


def decompress_weight(parts: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, module: str = "",
                      verify: bool = True, **checks: Any) -> torch.Tensor:
    """The dense weight from :func:`compress_weight`'s entries (a dense entry is returned as it is), cast to
    ``dtype`` if given. Decoding and the cast run in row chunks: the only full-size tensor allocated is the result.

    Every entry is checked against the others first (:func:`hf_sparse.formats.integrity.check_group`, which also
    takes the ``pattern``, ``sparsity``, ``shape`` and ``expected_hash`` in ``checks``): broken entries raise a
    ``ValueError`` naming ``module`` (the weight's module), never decode into wrong weights. ``verify=False`` skips
    those checks, for entries a caller has just checked (the loader checks every file before any weight is read).

    >>> w = torch.tensor([[0., -0., 3., 0.], [-1., 0., 0., 2.]])
    >>> back = decompress_weight(compress_weight(w))
    >>> torch.equal(back, w), back[0, 1].item()  # the pruned -0.0 comes back as +0.0
    (True, 0.0)
    """
    if verify:
        check_group(module, parts, **checks)
    if LAYOUT not in parts:
        return parts[VALUES] if dtype is None else parts[VALUES].to(dtype)
    rows, cols, n, m = parts[LAYOUT].tolist()
    values = parts[VALUES]
    if POSITIONS in parts:
        dense = decode_n_m(values, parts[POSITIONS], cols, n, m, dtype)
    else:
        dense = decode_bitmask(values, parts[BITMASK], cols, dtype)
    if dense.shape != (rows, cols):
        raise ValueError(f"decoded shape {tuple(dense.shape)} differs from the stored layout ({rows}, {cols})")
    return dense


def split_key(key: str) -> tuple[str, str]:
    """``"a.b.weight_bitmask"`` -> ``("a.b", "weight_bitmask")``."""
    prefix, _, suffix = key.rpartition(".")
    return prefix, suffix


def compressed_groups(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Module prefix -> {suffix: full key} for every compressed weight among ``keys`` (found by its layout entry)."""
    keys = list(keys)
    prefixes = {split_key(k)[0] for k in keys if split_key(k)[1] == LAYOUT}
    groups: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    for key in keys:
        prefix, suffix = split_key(key)
        if prefix in groups and suffix in (VALUES, *COMPANIONS):
            groups[prefix][suffix] = key
    for prefix, group in groups.items():
        if VALUES not in group:
            raise ValueError(f"compressed weight {shown(prefix)} has {sorted(group)} but no {shown(VALUES)} (values) entry")
    return groups


@dataclass
class StorageSummary:
    """Bytes of the tensors as stored against the same tensors dense; encodings chosen per compressed module."""

    dense_bytes: int = 0
    stored_bytes: int = 0
    encodings: dict[str, str] = field(default_factory=dict)  # module -> "n:m" | "bitmask" | "dense"
    hashes: dict[str, str] = field(default_factory=dict)  # module -> SHA-256 of its compact entries (integrity)

    def add(self, dense: int, stored: int) -> None:
        self.dense_bytes += dense
        self.stored_bytes += stored

    def record_entry(self) -> dict[str, Any]:
        """The ``storage`` entry of the sparsity record."""
        counts: dict[str, int] = {}
        for encoding in self.encodings.values():
            counts[encoding] = counts.get(encoding, 0) + 1
        entry = {"format": STORAGE_FORMAT, "version": STORAGE_VERSION, "dense_bytes": self.dense_bytes,
                 "stored_bytes": self.stored_bytes, "encodings": counts}
        if self.hashes:
            entry[HASH_KEY] = dict(sorted(self.hashes.items()))
        return entry

    def describe(self) -> str:
        """One line for people: bytes stored against dense and the encodings.

        >>> StorageSummary(dense_bytes=2 << 20, stored_bytes=1 << 20, encodings={"a": "n:m"}).describe()
        'tensors 1.00 MiB, 0.500 of the 2.00 MiB dense (1 matrix in N:M form)'
        """
        return describe_storage(self.record_entry())


_ENCODING_NAMES = {N_M: "N:M form", UNSTRUCTURED: "bitmask form", DENSE: "dense form"}


def describe_storage(entry: Mapping[str, Any]) -> str:
    """:meth:`StorageSummary.describe` of a record's ``storage`` entry."""
    mib = 1 << 20
    dense, stored = entry["dense_bytes"], entry["stored_bytes"]
    counts = ", ".join(f"{count} matri{'x' if count == 1 else 'ces'} in {_ENCODING_NAMES.get(name, name)}"
                       for name, count in sorted(entry.get("encodings", {}).items()))
    return (f"tensors {stored / mib:.2f} MiB, {stored / max(dense, 1):.3f} of the {dense / mib:.2f} MiB dense"
            + (f" ({counts})" if counts else ""))


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_patterns(record) -> dict[str, SparsityPattern]:
    """Each pruned module of a :class:`~hf_sparse.record.SparsityRecord` with the pattern it was (last) pruned with."""
    return {name: record.pattern_of(name) for name in record.modules}


def check_matches_record(module: str, weight: torch.Tensor, pattern: SparsityPattern | str | None,
                         sparsity: float | None) -> None:
    """Refuse to compress a weight the record does not describe: its zeros must follow the N:M ``pattern`` the
    record claims and give the ``sparsity`` it lists (within one weight), as :func:`hf_sparse.get_masks` checks.

    >>> check_matches_record("lin", torch.ones(2, 4), "unstructured", 0.5)
    Traceback (most recent call last):
    ...
    ValueError: module 'lin' has sparsity 0.000000 but its sparsity record says 0.500000: the record does not describe these weights (changed after pruning?); prune it again or fix the record
    """
    if weight.dim() != 2:
        raise ValueError(f"the record lists module {shown(module)} but its weight has shape {tuple(weight.shape)}; "
                         "compact storage encodes 2-D weights")
    pattern = SparsityPattern.parse(pattern) if pattern is not None else None
    if pattern is not None and pattern.is_n_m and not fits_n_m(weight, pattern.n, pattern.m):
        raise ValueError(f"module {shown(module)} does not follow the pattern {shown(str(pattern))} its sparsity record "
                         f"claims (more than {pattern.n} non-zeros in some group of {pattern.m} inputs): the record "
                         "does not describe these weights; prune it again or fix the record")
    if sparsity is not None:
        achieved = 1.0 - count_kept(weight) / weight.numel()
        if not math.isclose(achieved, sparsity, abs_tol=1.0 / weight.numel() + 1e-9):
            raise ValueError(f"module {shown(module)} has sparsity {achieved:.6f} but its sparsity record says "
                             f"{sparsity:.6f}: the record does not describe these weights (changed after pruning?); "
                             "prune it again or fix the record")


def compress_entry(key: str, tensor: torch.Tensor, modules: Mapping[str, SparsityPattern | str | None],
                   summary: StorageSummary, sparsities: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Full-key entries storing one state-dict entry: compressed when it is the weight of one of ``modules``
    (module name -> its pattern, which decides whether N:M storage is tried). With ``sparsities`` (module name ->
    the record's sparsity) a weight the record does not describe is refused (:func:`check_matches_record`). The
    SHA-256 of every compressed weight's entries goes into ``summary.hashes``."""
    prefix, suffix = split_key(key)
    if suffix != VALUES or prefix not in modules:
        summary.add(tensor_bytes(tensor), tensor_bytes(tensor))
        return {key: tensor}
    if sparsities is not None:
        check_matches_record(prefix, tensor, modules[prefix], sparsities.get(prefix))
    elif tensor.dim() != 2:
        summary.add(tensor_bytes(tensor), tensor_bytes(tensor))
        return {key: tensor}
    parts = compress_weight(tensor, modules[prefix])
    summary.encodings[prefix] = N_M if POSITIONS in parts else UNSTRUCTURED if BITMASK in parts else DENSE
    if LAYOUT in parts:
        summary.hashes[prefix] = group_hash(parts)
    summary.add(tensor_bytes(tensor), sum(tensor_bytes(t) for t in parts.values()))
    return {f"{prefix}.{s}": t for s, t in parts.items()}


def storage_summary(state_dict: Mapping[str, torch.Tensor],
                    modules: Mapping[str, SparsityPattern | str | None]) -> StorageSummary:
    """The :class:`StorageSummary` :func:`compress_state_dict` would report, without building the compact tensors
    (one read of each pruned weight): what a model card says before the checkpoint is written.

    >>> sd = {"lin.weight": torch.tensor([[0., 1., 0., 2.] * 4] * 8, dtype=torch.float16), "lin.bias": torch.ones(8)}
    >>> estimate, written = storage_summary(sd, {"lin": "2:4"}), compress_state_dict(sd, {"lin": "2:4"})[1]
    >>> (estimate.stored_bytes, estimate.encodings) == (written.stored_bytes, written.encodings)
    True
    """
    summary = StorageSummary()
    for key, tensor in state_dict.items():
        prefix, suffix = split_key(key)
        dense = tensor_bytes(tensor)
        if suffix != VALUES or prefix not in modules or tensor.dim() != 2:
            summary.add(dense, dense)
            continue
        encoding, stored = choose_encoding(tensor.detach(), modules[prefix])
        summary.encodings[prefix] = encoding
        summary.add(dense, stored if encoding == DENSE else stored + LAYOUT_BYTES)
    return summary


def compress_state_dict(state_dict: Mapping[str, torch.Tensor],
                        modules: Mapping[str, SparsityPattern | str | None],
                        sparsities: Mapping[str, float] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                StorageSummary]:
    """A state dict with the weights of ``modules`` (name -> pattern) in compact form, and the byte summary (with
    the content hash of every compressed weight). With ``sparsities`` (the record's per module) every listed module
    must be in ``state_dict`` and match its record (:func:`check_matches_record`).

    >>> sd = {"lin.weight": torch.tensor([[0., 1., 0., 2.] * 4] * 8, dtype=torch.float16), "lin.bias": torch.ones(8)}
    >>> compact, summary = compress_state_dict(sd, {"lin": "2:4"})
    >>> sorted(compact), summary.encodings, summary.stored_bytes < summary.dense_bytes
    (['lin.bias', 'lin.weight', 'lin.weight_layout', 'lin.weight_positions'], {'lin': 'n:m'}, True)
    """
    if sparsities is not None:
        check_modules_present(modules, state_dict)
    summary = StorageSummary()
    compact: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        compact.update(compress_entry(key, tensor, modules, summary, sparsities))
    return compact, summary


def check_modules_present(modules: Iterable[str], keys: Iterable[str]) -> None:
    """Every module the record lists has a ``.weight`` among ``keys``."""
    present = {split_key(key)[0] for key in keys if split_key(key)[1] == VALUES}
    missing = sorted(set(modules) - present)
    if missing:
        raise ValueError(f"the sparsity record lists module {shown(missing[0])} but the checkpoint has no "
                         f"{shown(missing[0] + '.' + VALUES)} ({len(missing)} such): the record does not describe it")


def decompress_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_state_dict`: every compressed weight back to its dense tensor, bit for bit."""
    groups = compressed_groups(state_dict)
    grouped = {key for group in groups.values() for key in group.values()}
    dense = {key: tensor for key, tensor in state_dict.items() if key not in grouped}
    for prefix, group in groups.items():
        dense[f"{prefix}.{VALUES}"] = decompress_weight({s: state_dict[k] for s, k in group.items()}, module=prefix)
    return dense


def quantization_config_entry() -> dict[str, Any]:
    """The ``quantization_config`` a compressed checkpoint carries in ``config.json``.

    With hf_sparse imported it selects the decompressing loader (:mod:`hf_sparse.integrations.compressed`). Plain
    transformers only warns about a method it does not know: what stops it, naming hf_sparse, is the loading guard
    written next to it (:mod:`hf_sparse.formats.guard`); failing that, the size mismatch of the stored values.
    """
    return {"quant_method": STORAGE_FORMAT, "format_version": STORAGE_VERSION}
