"""Domain check: does the calibration data look like the text the pruned model will serve?

Wanda and SparseGPT fit the pruned weights to the calibration activations. Calibrated on one kind of text and used
on another, they can fall *behind* magnitude pruning (on the shared 7M model, WikiText calibration evaluated on fairy
tales at 70%: Wanda 114 and SparseGPT 99 against magnitude 81). ``SparsityConfig(target_data=...)`` gives a sample
of the served text; before pruning, :func:`check_domain` compares it with the calibration windows on the dense model:

* ``loss_gap``: the dense model's mean per-token loss on the target windows minus that on the calibration windows
  (nats). A model that finds the target much harder (or easier) than the calibration text sees different
  activations on it;
* ``token_overlap``: Σ_v min(p_v, q_v) of the two unigram token distributions, 1 for the same mix of tokens, 0 for
  disjoint vocabularies.

It warns, with the numbers, when ``|loss_gap| > MAX_LOSS_GAP`` or ``token_overlap < MIN_TOKEN_OVERLAP``; the report
goes into the record (``sparsity_config.domain_check``) and the model card. Measured on the 7M model (32 × 256
calibration windows vs 32 target windows): WikiText/WikiText overlap 0.65 (loss gap +0.52: the calibration split
was in its training data), Grimm/Grimm 0.73 (+0.02), WikiText→Grimm 0.33 (+0.71), Grimm→WikiText 0.35 (−0.17)
(Grimm = Project Gutenberg #2591 split by ``examples/split_book.py``; ``examples/benchmark_calibration_mix.py``).
The overlap separates the domains; the loss gap is confounded by what the model was trained on, so its threshold
is loose.

>>> token_overlap(torch.tensor([[1, 1, 2, 3]]), torch.tensor([[1, 2, 2, 2]]))
0.5
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..likelihood import token_nll
from .descriptors import describe_calibration
from .sources import read_texts

logger = logging.getLogger(__name__)

#: Thresholds of the warning, set from the measurements above (WikiText vs. Grimm's fairy tales on the 7M model: the
#: pair where Wanda/SparseGPT fall behind magnitude).
MAX_LOSS_GAP = 1.0
MIN_TOKEN_OVERLAP = 0.5
#: Target windows compared (at most; fewer when the target text is short).
MAX_TARGET_WINDOWS = 32


@dataclass
class DomainReport:
    """What the domain check measured (``sparsity_config.domain_check``)."""

    calibration_loss: float = field(metadata={"help": "Dense mean per-token loss on the calibration windows (nats)."})
    target_loss: float = field(metadata={"help": "Dense mean per-token loss on the target windows (nats)."})
    loss_gap: float = field(metadata={"help": "target_loss - calibration_loss."})
    token_overlap: float = field(metadata={"help": "Σ min(p, q) of the unigram token distributions.",
                                           "range": "[0, 1]"})
    target_windows: int = field(metadata={"help": "Target windows compared.", "range": "> 0"})
    mismatch: bool = field(metadata={"help": "True when a threshold was crossed (a warning was logged)."})
    target: dict[str, Any] | None = field(default=None, metadata={"help": "Descriptor of the target data."})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self) -> str:
        verdict = ("differ enough that Wanda/SparseGPT may do worse than magnitude pruning on the target; calibrate "
                   "on text like the target (or a mix that includes it)" if self.mismatch else "look alike")
        return (f"calibration vs target data: dense loss {self.calibration_loss:.3f} vs {self.target_loss:.3f} nats "
                f"(gap {self.loss_gap:+.3f}, warn above ±{MAX_LOSS_GAP}), token overlap {self.token_overlap:.3f} "
                f"(warn below {MIN_TOKEN_OVERLAP}) over {self.target_windows} target windows: they {verdict}")


def token_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ_v min(p_v, q_v) of the unigram distributions of the token ids in ``a`` and ``b``."""
    size = int(max(a.max(), b.max())) + 1
    p = torch.bincount(a.reshape(-1), minlength=size).double()
    q = torch.bincount(b.reshape(-1), minlength=size).double()
    return float(torch.minimum(p / p.sum(), q / q.sum()).sum())


def _mean_loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        nll = token_nll(model, batch.to(device))
        total += nll.double().sum().item()
        count += nll.numel()
    return total / count


def target_windows(target: Any, tokenizer, sequence_length: int) -> torch.Tensor:
    """The first ``MAX_TARGET_WINDOWS`` non-overlapping windows of the target text (fewer if it is short; one
    shorter window if it has fewer tokens than ``sequence_length``)."""
    texts = read_texts(target) if isinstance(target, str) else list(target)
    stream = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    if stream.numel() < 2:
        raise ValueError(f"target_data has {stream.numel()} tokens; give at least a sentence of the target text")
    length = min(sequence_length, stream.numel())
    count = min(MAX_TARGET_WINDOWS, stream.numel() // length)
    return stream[: count * length].reshape(count, length)


@torch.no_grad()
def check_domain(model: nn.Module, calibration_ids: torch.Tensor, target: Any, tokenizer,
                 batch_size: int = 8) -> DomainReport:
    """Compare ``calibration_ids`` with the ``target`` text (a path or a list of strings) on the dense ``model``;
    logs a warning with the numbers when they differ enough (see the module doc).

    >>> report = check_domain(model, calibration_ids, "served-sample.txt", tokenizer)  # doctest: +SKIP
    >>> report.mismatch, round(report.token_overlap, 2)  # doctest: +SKIP
    (True, 0.52)
    """
    target_ids = target_windows(target, tokenizer, calibration_ids.shape[1])
    was_training = model.training
    model.eval()
    try:
        calibration_loss = _mean_loss(model, calibration_ids, batch_size)
        target_loss = _mean_loss(model, target_ids, batch_size)
    finally:
        model.train(was_training)
    overlap = token_overlap(calibration_ids, target_ids)
    gap = target_loss - calibration_loss
    report = DomainReport(round(calibration_loss, 6), round(target_loss, 6), round(gap, 6), round(overlap, 6),
                          int(target_ids.shape[0]), abs(gap) > MAX_LOSS_GAP or overlap < MIN_TOKEN_OVERLAP,
                          describe_calibration(target))
    (logger.warning if report.mismatch else logger.info)(report.message())
    return report


__all__ = ["MAX_LOSS_GAP", "MAX_TARGET_WINDOWS", "MIN_TOKEN_OVERLAP", "DomainReport", "check_domain",
           "target_windows", "token_overlap"]
