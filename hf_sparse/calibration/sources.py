"""Calibration sources -> a ``(num_samples, sequence_length)`` tensor of token ids, and the checks that run first.

Sources: a Hugging Face dataset name, a local text/JSON file or folder of them, a list of strings, or token ids.
Text is tokenized once as one stream and ``num_samples`` windows are drawn at seeded random offsets, as the
Wanda and SparseGPT papers draw theirs from the training corpus.

The checks (:func:`check_source`, :func:`check_fits_model`, :func:`tokenizer_for`) need no weights, so prune on
load runs them before the checkpoint is read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import PATH_SHOWN, shown

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
_NOT_IDS = (torch.bool, torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.complex64,
            torch.complex128)


# ---------------------------------------------------------------------------------------------------------------
# Checks that need neither the data nor the weights


def looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path (a dataset name never starts with . / ~ or ends in .txt).

    >>> looks_like_path("./data.txt"), looks_like_path("wikitext")
    (True, False)
    """
    return source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)


def missing_path(source: Any) -> bool:
    """Whether ``source`` is a string meant as a local path (:func:`looks_like_path`) that does not exist."""
    if not isinstance(source, str) or not looks_like_path(source):
        return False
    try:
        return not Path(source).expanduser().exists()
    except OSError:  # "file name too long": raw text, reported as such by read_texts
        return False


def is_token_source(source: Any) -> bool:
    """Token ids (a tensor, or a list of lists) rather than text: no tokenizer is needed."""
    return isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and bool(source) and isinstance(source[0], (list, tuple)))


def check_source(source: Any, method: str | None = None) -> None:
    """Raise the one-line error for a missing source or a local path that does not exist.

    >>> check_source(None, "wanda")
    Traceback (most recent call last):
    ...
    ValueError: method 'wanda' needs calibration data: set SparsityConfig(calibration=...) to a dataset name, a text file or folder, a list of strings, or token ids
    """
    if source is None:
        who = f"method {shown(method)}" if method else "this method"
        raise ValueError(
            f"{who} needs calibration data: set SparsityConfig(calibration=...) to a dataset name, a text file or "
            "folder, a list of strings, or token ids"
        )
    if not isinstance(source, (str, os.PathLike, list, tuple, torch.Tensor)):
        raise ValueError(f"calibration source of type {type(source).__name__} is not supported: give a dataset name, "
                         "a path, a list of strings, or token ids")
    if isinstance(source, (str, list, tuple)) and not source:
        raise ValueError(f"calibration {shown(source)} is empty: give a dataset name, a path, texts or token ids")
    if missing_path(source):
        raise ValueError(f"calibration path {shown(source, PATH_SHOWN)} does not exist")


def _context_length(model_config: Any) -> int | None:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_fits_model(source: Any, sequence_length: int, model: Any) -> None:
    """Windows no longer than the model's context and token ids inside its vocabulary (works on a meta model).

    Positions beyond ``max_position_embeddings`` are silently extrapolated by RoPE models and an ``IndexError`` in
    OPT; ids outside the embedding table are an ``IndexError`` deep in the forward pass: both are refused here.
    """
    tokens = _as_token_tensor(source)
    length = min(sequence_length, tokens.shape[1]) if tokens is not None else sequence_length
    context = _context_length(model.config)
    if context is not None and length > context:
        raise ValueError(
            f"sequence_length={length} is longer than the model's context (max_position_embeddings={context}); "
            f"use sequence_length <= {context}"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if tokens is not None and vocab is not None and int(tokens.max()) >= vocab:
        raise ValueError(
            f"calibration token id {int(tokens.max())} is outside the model's vocabulary: ids must be in "
            f"[0, {vocab - 1}] (the embedding has {vocab} rows)"
        )


def tokenizer_for(model: Any):
    """``AutoTokenizer`` of the model's own folder or Hub id, with a one-line error when there is none."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError("text calibration needs a tokenizer and the model has no name_or_path: pass tokenizer=...")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:  # transformers' "can't find a tokenizer" comes as any of these
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"text calibration needs a tokenizer, and none could be loaded from {shown(Path(str(source)).name)} "
            f"({first_line[:200]}); pass SparsityConfig(tokenizer=...) or token ids as calibration"
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Reading sources


def _read_text_file(path: Path, column: str) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"calibration file {shown(str(path), PATH_SHOWN)} is not UTF-8 text (byte {error.start}: "
                         f"{error.reason}); convert it to UTF-8") from None
    if path.suffix not in JSON_SUFFIXES:
        return [raw]
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            rows = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"calibration file {shown(str(path), PATH_SHOWN)} is not valid JSON"
                         f"{' Lines' if path.suffix == '.jsonl' else ''}: {error}") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise ValueError(f"calibration file {shown(str(path), PATH_SHOWN)} must hold a list of rows (objects or strings), "
                         f"got {type(rows).__name__}")
    try:
        return [row[column] if isinstance(row, dict) else str(row) for row in rows]
    except KeyError:
        raise ValueError(f"calibration file {shown(str(path), PATH_SHOWN)} has rows without the column {shown(column)}") from None


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
            raise ValueError(f"calibration folder {shown(source, PATH_SHOWN)} has no {TEXT_SUFFIXES + JSON_SUFFIXES} files")
        return [text for file in files for text in _read_text_file(file, column)]
    check_source(source)  # a path that does not exist is not a dataset name
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as error:  # the datasets library raises many types; the user needs the name and the cause
        raise ValueError(
            f"could not load calibration dataset {shown(source)} (subset={shown(subset)}, split={shown(split)}): {error}"
        ) from error
    if column not in dataset.column_names:
        raise ValueError(f"calibration dataset {shown(source)} has no column {shown(column)}; columns: {dataset.column_names}")
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
    """Token ids as a ``(rows, columns)`` long tensor, ``None`` for text sources; bad ids raise one-line errors."""
    if isinstance(source, torch.Tensor):
        tensor = source
    elif isinstance(source, (list, tuple)) and source and all(isinstance(row, (list, tuple)) for row in source):
        lengths = {len(row) for row in source}
        if len(lengths) != 1:
            raise ValueError(f"token-id calibration rows must all have the same length, got lengths {sorted(lengths)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for row in source for v in row):
            bad = next(v for row in source for v in row if not isinstance(v, int) or isinstance(v, bool))
            raise ValueError(f"token-id calibration must hold integers, got {shown(bad)} ({type(bad).__name__})")
        tensor = torch.tensor(source, dtype=torch.long)
    else:
        return None
    if tensor.dim() != 2 or tensor.dtype in _NOT_IDS:
        raise ValueError(
            f"token-id calibration must be a 2-D integer tensor (num_samples, sequence_length), got "
            f"dtype={tensor.dtype} shape={tuple(tensor.shape)}"
        )
    if tensor.numel() == 0:
        raise ValueError(f"token-id calibration is empty (shape {tuple(tensor.shape)}); give at least one row of "
                         "at least one token")
    if int(tensor.min()) < 0:
        raise ValueError(f"calibration token id {int(tensor.min())} is negative: ids must be >= 0 (indices into "
                         "the vocabulary)")
    return tensor.to(torch.long)


def load_calibration(source: Any, tokenizer=None, num_samples: int = 128, sequence_length: int = 2048,
                     seed: int = 0, split: str = "train", column: str = "text",
                     subset: str | None = None) -> torch.Tensor:
    """Token ids ``(num_samples, sequence_length)`` drawn from ``source``.

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ids = load_calibration(["a long text ..."], tokenizer, num_samples=4, sequence_length=16)  # doctest: +SKIP
    """
    check_source(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
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
    elif isinstance(source, (list, tuple)):
        kind = (list, tuple) if isinstance(source[0], (list, tuple)) else str
        index = next(i for i, item in enumerate(source) if not isinstance(item, kind))
        raise ValueError(f"calibration list item {index} is {shown(source[index])} ({type(source[index]).__name__}); "
                         "a calibration list holds strings (texts) or rows of token ids, not both (for several "
                         "sources, give calibration_weights)")
    else:
        raise ValueError(
            f"calibration source of type {type(source).__name__} is not supported: give a dataset name, a path, "
            "a list of strings, or token ids"
        )
    if tokenizer is None:
        raise ValueError("text calibration needs a tokenizer: pass tokenizer=... (or SparsityConfig(tokenizer=...))")
    stream = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    return sample_windows(stream, num_samples, sequence_length, seed)
