"""Perplexity on held-out text, measured the way the pruning papers report it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..likelihood import token_nll  # shared with the calibration domain check (hf_sparse.calibration.domain)


def token_windows(token_ids: torch.Tensor, sequence_length: int, stride: int | None = None,
                  max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """``(begin, end, scored_from)`` spans covering a 1-D token stream.

    With ``stride == sequence_length`` (the default) the windows do not overlap and every token is scored once,
    as in the Wanda/SparseGPT evaluation; a smaller stride gives each window ``sequence_length - stride`` tokens
    of context that are not scored again. A trailing partial window is dropped, as those papers do.
    """
    stride = stride or sequence_length
    if not 0 < stride <= sequence_length:
        raise ValueError(f"stride must be in [1, sequence_length={sequence_length}], got {stride}")
    spans, begin, total = [], 0, token_ids.numel()
    while begin + sequence_length <= total:
        scored_from = 0 if not spans else sequence_length - stride
        spans.append((begin, begin + sequence_length, scored_from))
        begin += stride
        if max_windows is not None and len(spans) >= max_windows:
            break
    if not spans:
        raise ValueError(f"the evaluation text has {total} tokens, fewer than one window of {sequence_length}")
    return spans


@torch.no_grad()
def model_context(model: nn.Module) -> int | None:
    """The longest sequence ``model`` was built for (``config.max_position_embeddings`` or its GPT-2 name), if known."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model: nn.Module, sequence_length: int, stride: int | None = None, batch_size: int = 1,
                 max_windows: int | None = None) -> None:
    """Refuse evaluation settings that cannot give a meaningful perplexity: a window longer than the model's context
    (positions it never saw: the number would be printed but mean nothing), non-positive sizes.

    >>> from types import SimpleNamespace
    >>> check_window(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024)), 5000)
    Traceback (most recent call last):
    ...
    ValueError: sequence_length 5000 is longer than the model's context of 1024 tokens; allowed: 2..1024
    """
    for name, value, low in (("sequence_length", sequence_length, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} {value!r} is not allowed; an integer >= {low}")
    for name, value in (("stride", stride), ("max_windows", max_windows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value!r} is not allowed; a positive integer or None")
    context = model_context(model)
    if context is not None and sequence_length > context:
        raise ValueError(f"sequence_length {sequence_length} is longer than the model's context of {context} tokens; "
                         f"allowed: 2..{context}")


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: str | Sequence[str], sequence_length: int = 2048,
               stride: int | None = None, batch_size: int = 8, max_windows: int | None = None,
               show_progress: bool = True) -> float:
    """Perplexity of ``model`` on ``texts`` (joined by blank lines and tokenized as one stream).

    >>> perplexity(model, tokenizer, open("wikitext2-test.txt").read(), sequence_length=256)  # doctest: +SKIP
    53.06

    A ``sequence_length`` beyond the model's context raises ``ValueError`` (:func:`check_window`).
    """
    check_window(model, sequence_length, stride, batch_size, max_windows)
    if isinstance(texts, str):
        texts = [texts]
    stream = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    spans = token_windows(stream, sequence_length, stride, max_windows)
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        progress = tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not show_progress)
        for start in progress:
            chunk = spans[start : start + batch_size]
            ids = torch.stack([stream[b:e] for b, e, _ in chunk]).to(device)  # (batch, seq)
            nll = token_nll(model, ids)  # (batch, seq-1)
            for row, (_b, _e, scored_from) in enumerate(chunk):
                # Token t is predicted at position t-1; a token counts when it lies in the scored part.
                scored = nll[row, max(scored_from, 1) - 1 :]
                total_nll += scored.double().sum().item()
                total_tokens += scored.numel()
            progress.set_postfix_str(f"{total_tokens:,} tokens, ppl so far {math.exp(total_nll / total_tokens):.2f}")
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
