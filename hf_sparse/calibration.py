"""Turn a calibration source into a ``(num_samples, sequence_length)`` tensor of token ids.

Sources: a Hugging Face dataset name, a local text/JSON file or folder of them, a list of strings, or token ids.
Text is tokenized once as one stream and ``num_samples`` windows are drawn at seeded random offsets, as the
Wanda and SparseGPT papers draw theirs from the training corpus.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".json", ".jsonl")


def _read_text_file(path: Path, column: str) -> list[str]:
    if path.suffix in JSON_SUFFIXES:
        raw = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        if isinstance(rows, dict):
            rows = [rows]
        try:
            return [row[column] if isinstance(row, dict) else str(row) for row in rows]
        except KeyError:
            raise ValueError(f"calibration file {str(path)!r} has rows without the column {column!r}") from None
    return [path.read_text(encoding="utf-8")]


def read_texts(source: str, split: str = "train", column: str = "text", subset: str | None = None,
               max_documents: int | None = None, seed: int = 0) -> list[str]:
    """Texts of a local file or folder, or of a Hugging Face dataset (``split``/``column``/``subset``)."""
    path = Path(source).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # e.g. "file name too long": the user passed raw text, not a path
        raise ValueError(
            f"calibration string {source[:40]!r}... is neither an existing path nor a dataset name; pass raw text "
            "as a list of strings: calibration=[text]"
        ) from None
    if is_file:
        return _read_text_file(path, column)
    if is_dir:
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"calibration folder {source!r} has no {TEXT_SUFFIXES + JSON_SUFFIXES} files")
        return [text for file in files for text in _read_text_file(file, column)]
    if source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + JSON_SUFFIXES):
        raise ValueError(f"calibration path {source!r} does not exist")
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as error:  # the datasets library raises many types; the user needs the name and the cause
        raise ValueError(
            f"could not load calibration dataset {source!r} (subset={subset!r}, split={split!r}): {error}"
        ) from error
    if column not in dataset.column_names:
        raise ValueError(f"calibration dataset {source!r} has no column {column!r}; columns: {dataset.column_names}")
    if max_documents is not None and len(dataset) > max_documents:
        dataset = dataset.shuffle(seed=seed).select(range(max_documents))
    return [text for text in dataset[column] if text]


def sample_windows(token_stream: torch.Tensor, num_samples: int, sequence_length: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``sequence_length`` tokens at seeded random offsets of a 1-D token stream."""
    total = token_stream.numel()
    if total < sequence_length:
        raise ValueError(
            f"calibration text has {total} tokens, fewer than one window of sequence_length={sequence_length}; "
            "give more text or a shorter sequence_length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - sequence_length + 1, (num_samples,), generator=generator)
    return torch.stack([token_stream[s : s + sequence_length] for s in starts.tolist()])


def _as_token_tensor(source: Any) -> torch.Tensor | None:
    if isinstance(source, torch.Tensor):
        tensor = source
    elif isinstance(source, (list, tuple)) and source and all(isinstance(row, (list, tuple)) for row in source):
        lengths = {len(row) for row in source}
        if len(lengths) != 1:
            raise ValueError(f"token-id calibration rows must all have the same length, got lengths {sorted(lengths)}")
        tensor = torch.tensor(source)
    else:
        return None
    if tensor.dim() != 2 or tensor.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(
            f"token-id calibration must be a 2-D integer tensor (num_samples, sequence_length), got "
            f"dtype={tensor.dtype} shape={tuple(tensor.shape)}"
        )
    return tensor.to(torch.long)


def load_calibration(source: Any, tokenizer=None, num_samples: int = 128, sequence_length: int = 2048,
                     seed: int = 0, split: str = "train", column: str = "text",
                     subset: str | None = None) -> torch.Tensor:
    """Token ids ``(num_samples, sequence_length)`` drawn from ``source``.

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ids = load_calibration(["a long text ..."], tokenizer, num_samples=4, sequence_length=16)  # doctest: +SKIP
    """
    if source is None:
        raise ValueError(
            "this method needs calibration data: set SparsityConfig(calibration=...) to a dataset name, a text "
            "file or folder, a list of strings, or token ids"
        )
    tokens = _as_token_tensor(source)
    if tokens is not None:
        if tokens.shape[0] < num_samples:
            logger.warning("calibration token ids have %d rows, fewer than num_samples=%d: using all of them",
                           tokens.shape[0], num_samples)
        if tokens.shape[1] < sequence_length:
            logger.warning("calibration token ids have %d columns, fewer than sequence_length=%d: using all of them",
                           tokens.shape[1], sequence_length)
        return tokens[:num_samples, :sequence_length]
    if isinstance(source, str):
        # Enough documents for the windows, with margin; a whole web-scale dataset is never tokenized.
        texts = read_texts(source, split, column, subset, max_documents=max(1000, 4 * num_samples), seed=seed)
    elif isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        texts = list(source)
    else:
        raise ValueError(
            f"calibration source of type {type(source).__name__} is not supported: give a dataset name, a path, "
            "a list of strings, or token ids"
        )
    if tokenizer is None:
        raise ValueError("text calibration needs a tokenizer: pass tokenizer=... (or SparsityConfig(tokenizer=...))")
    stream = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    return sample_windows(stream, num_samples, sequence_length, seed)
