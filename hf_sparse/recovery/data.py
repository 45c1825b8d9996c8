"""Training data for recovery: any calibration source packed into training sequences, with a held-out part.

Text sources (a file, a folder, a dataset name, a list of strings) are tokenized as one stream and cut into
consecutive, non-overlapping sequences of ``sequence_length`` tokens (packing: every token is used once per pass, no
padding). The sequences are shuffled with the seed, the held-out ones are taken first, and the rest is cycled for as
many passes as ``steps × batch_size`` needs. Token ids (a ``(rows, columns)`` tensor or list of lists) are used
row by row, cut to ``sequence_length``. A mix (``sources`` with ``weights``, as ``SparsityConfig`` takes them) draws
each source's share of windows with :func:`hf_sparse.calibration.mixes.load_mix`. The same inputs and seed always
give the same sequences, in the same order.

>>> import torch
>>> data = pack_training_data(torch.arange(40).reshape(4, 10), None, sequence_length=8, heldout_fraction=0.25,
...                           max_heldout=4, seed=0)
>>> data.train.shape, data.heldout.shape
(torch.Size([3, 8]), torch.Size([1, 8]))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration import describe_calibration, is_token_source, load_calibration, read_texts
from ..calibration.mixes import check_mix, load_mix

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Packed sequences: ``train`` ``(n, sequence_length)`` and ``heldout`` ``(m, sequence_length)`` token ids."""

    train: torch.Tensor
    heldout: torch.Tensor

    def batches_for(self, steps: int, batch_size: int) -> torch.Tensor:
        """The training sequences repeated (whole passes, in order) to cover ``steps × batch_size`` rows."""
        needed = steps * batch_size
        passes = math.ceil(needed / self.train.shape[0])
        if passes > 1:
            logger.info("recovery: %d training sequences cover %d steps x %d in %d passes", self.train.shape[0],
                        steps, batch_size, passes)
        return self.train.repeat(passes, 1)[:needed]


class SequenceDataset(torch.utils.data.Dataset):
    """Rows of a token-id tensor as ``{"input_ids", "labels"}`` examples (what ``transformers.Trainer`` feeds)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "labels": row}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples into a batch."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def _text_stream(source: Any, tokenizer) -> torch.Tensor:
    if isinstance(source, str):
        texts = read_texts(source)
    elif isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        texts = list(source)
    else:
        raise ValueError(f"recovery data of type {type(source).__name__} is not supported: give a file, folder or "
                         "dataset name, a list of strings, or token ids")
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise ValueError("recovery data has no text (empty file, folder or list); give training text")
    if tokenizer is None:
        raise ValueError("text recovery data needs a tokenizer: pass tokenizer=...")
    return tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False,
                     verbose=False)["input_ids"][0]


def _split(sequences: torch.Tensor, heldout_fraction: float, max_heldout: int, seed: int) -> TrainingData:
    order = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(seed))
    sequences = sequences[order]
    heldout = min(max_heldout, int(heldout_fraction * sequences.shape[0]))
    if heldout_fraction > 0 and max_heldout > 0 and sequences.shape[0] >= 2:
        heldout = max(1, heldout)
    if sequences.shape[0] - heldout < 1:
        raise ValueError(f"recovery data gives {sequences.shape[0]} sequence(s), none left for training after "
                         f"{heldout} held out; give more data or a shorter sequence_length")
    return TrainingData(train=sequences[heldout:], heldout=sequences[:heldout])


def pack_training_data(data: Any, tokenizer, sequence_length: int, heldout_fraction: float = 0.05,
                       max_heldout: int = 32, seed: int = 0, weights: Any = None,
                       num_sequences: int | None = None) -> TrainingData:
    """Training and held-out sequences of ``sequence_length`` tokens from ``data`` (see the module docstring).

    ``weights`` makes ``data`` a mix of sources; a mix draws ``num_sequences`` windows (default 1024).
    """
    if data is None or (isinstance(data, (list, tuple, str)) and len(data) == 0):
        raise ValueError(f"recovery needs training data, got {data!r}: give a text file, folder, dataset name, list "
                         "of strings or token ids")
    if weights is not None:
        shares = check_mix(data, weights)
        count = num_sequences or 1024
        sequences = load_mix(list(data), shares, tokenizer, count, sequence_length, seed)
        return _split(sequences, heldout_fraction, max_heldout, seed)
    if is_token_source(data):
        ids = load_calibration(data, None, num_samples=len(data), sequence_length=sequence_length, seed=seed)
        if ids.shape[1] < 2:
            raise ValueError(f"recovery token ids have {ids.shape[1]} column(s); a training sequence needs at least "
                             "2 tokens (one to predict from, one to predict)")
        return _split(ids, heldout_fraction, max_heldout, seed)
    stream = _text_stream(data, tokenizer)
    count = stream.numel() // sequence_length
    if count < 1:
        raise ValueError(f"recovery data has {stream.numel()} tokens, fewer than one sequence of sequence_length="
                         f"{sequence_length}; give more text or a shorter sequence_length")
    sequences = stream[: count * sequence_length].reshape(count, sequence_length)  # packed, no padding
    return _split(sequences, heldout_fraction, max_heldout, seed)


def describe_data(data: Any, weights: Any = None) -> dict[str, Any]:
    """What the record keeps of the training data: a dataset or local file/folder by name and content hash."""
    descriptor = describe_calibration(data, weights) or {}
    if descriptor.get("kind") in ("name_or_path", "file", "folder"):
        return {"data": descriptor["name"], **({"data_sha256": descriptor["sha256"]} if "sha256" in descriptor else {})}
    return {"data": descriptor}


__all__ = ["SequenceDataset", "TrainingData", "collate", "describe_data", "pack_training_data"]
