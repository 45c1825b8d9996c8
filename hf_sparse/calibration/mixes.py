"""Calibration mixes: several sources, each giving its share of the windows.

``SparsityConfig(calibration=[source, source, ...], calibration_weights=[w, w, ...])``: every source is any kind
:func:`~hf_sparse.calibration.load_calibration` accepts (a file, folder, dataset name, a list of strings, token ids),
and source ``i`` gives ``w_i / Σw`` of the ``num_samples`` windows (rounded cumulatively, so the counts add up to
``num_samples`` exactly). Without ``calibration_weights`` a list of strings stays what it always was: raw texts.

>>> mix_counts([1, 1], 5), mix_counts([3, 1], 8)
([2, 3], [6, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import shown
from ..validation import check_value
from .sources import check_source, is_token_source, load_calibration


def mix_counts(weights: Sequence[float], num_samples: int) -> list[int]:
    """Windows per source: ``num_samples`` split in proportion to ``weights``, cumulatively rounded (the weights are
    scaled by their largest first, so no sum overflows)."""
    largest = max(weights)
    weights = [weight / largest for weight in weights]
    total = float(sum(weights))
    counts, cumulative, previous = [], 0.0, 0
    for weight in weights:
        cumulative += weight
        target = int(round(num_samples * cumulative / total))
        counts.append(target - previous)
        previous = target
    return counts


def check_mix(sources: Any, weights: Any, num_samples: int | None = None) -> list[float]:
    """Raise unless ``sources`` is a list with one finite positive weight each, every source getting at least one of
    the ``num_samples`` windows; returns the weights as floats.

    >>> check_mix(["a.txt", "b.txt"], [1e-300, 1], 128)
    Traceback (most recent call last):
    ...
    ValueError: calibration_weights[0] = 1e-300 gives source 0 none of the 128 windows (num_samples); every source needs at least one: allowed are finite positive weights whose shares of num_samples round to 1 or more
    """
    if not isinstance(sources, (list, tuple)) or len(sources) < 1:
        raise ValueError(f"calibration_weights needs calibration to be a list of sources (files, dataset names, "
                         f"lists of strings, token ids), got {type(sources).__name__}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(sources):
        raise ValueError(f"calibration_weights must hold one weight per calibration source ({len(sources)}), got "
                         f"{shown(weights)}")
    checked = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"calibration_weights[{index}] must be a finite positive number, got {shown(weight)} "
                             f"({type(weight).__name__})")
        checked.append(check_value(f"calibration_weights[{index}]", weight, float, {"range": "> 0"}))
    if num_samples is not None:
        for index, count in enumerate(mix_counts(checked, num_samples)):
            if count < 1:
                raise ValueError(f"calibration_weights[{index}] = {shown(weights[index])} gives source {index} none "
                                 f"of the {num_samples} windows (num_samples); every source needs at least one: "
                                 "allowed are finite positive weights whose shares of num_samples round to 1 or more")
    for index, source in enumerate(sources):
        if source is None:
            raise ValueError(f"calibration source {index} of the mix is None; each source is a dataset name, a path, "
                             "a list of strings or token ids")
        try:
            check_source(source)
        except ValueError as error:
            raise ValueError(f"calibration source {index} of the mix: {error}") from None
    return checked


def load_mix(sources: Sequence[Any], weights: Sequence[float], tokenizer, num_samples: int, sequence_length: int,
             seed: int, **options) -> torch.Tensor:
    """``(num_samples, sequence_length)`` token ids, each source's share drawn from it (in source order)."""
    parts = []
    for index, (source, count) in enumerate(zip(sources, mix_counts(weights, num_samples))):
        if count == 0:
            continue
        # Each source gets its own seed, so adding a source does not move the windows drawn from the others.
        try:
            part = load_calibration(source, None if is_token_source(source) else tokenizer, count, sequence_length,
                                    seed + index, **options)
        except ValueError as error:
            raise ValueError(f"calibration source {index} of the mix: {error}") from None
        if part.shape[1] != sequence_length:
            raise ValueError(f"calibration source {index} gives windows of {part.shape[1]} tokens, the others "
                             f"{sequence_length}: token-id sources in a mix need sequence_length columns")
        parts.append(part)
    return torch.cat(parts)


__all__ = ["check_mix", "load_mix", "mix_counts"]
