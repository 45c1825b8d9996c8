"""Per-token negative log-likelihood of a causal language model: the one measurement shared by the calibration
domain check (:mod:`hf_sparse.calibration.domain`) and held-out perplexity (:mod:`hf_sparse.evaluation.perplexity`).

>>> import torch
>>> class Uniform(torch.nn.Module):  # every next token equally likely among 4
...     def forward(self, input_ids, use_cache=False):
...         return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 4)})()
>>> token_nll(Uniform(), torch.tensor([[0, 1, 2]]))  # ln 4 per predicted token
tensor([[1.3863, 1.3863]])
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every token but the first of each row of ``ids`` (batch, seq): (batch, seq-1)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (batch, seq, vocab)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    return -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
