"""Measuring a (pruned) model: perplexity, zero-shot tasks through lm-eval-harness, speed, and sparsity sweeps.

* :func:`perplexity` — held-out perplexity, as the pruning papers report it (no extra dependency);
* :func:`zero_shot` — lm-eval-harness tasks on the already-loaded model (extra ``hf-sparse[eval]``);
* :func:`benchmark` — prefill/decode throughput, time to first token, peak memory, checkpoint size;
* :func:`run_sweep` — prune at many (method, sparsity) settings, evaluate each, resumable, with a plot;
* :mod:`hf_sparse.plots` — the pictures (extra ``hf-sparse[plots]``, i.e. matplotlib), a layer below: model cards
  (:mod:`hf_sparse.integrations.hub`) draw them too.

>>> from hf_sparse.evaluation import perplexity, zero_shot, benchmark, run_sweep
"""

from .bench import BenchResult, benchmark, compare
from .perplexity import perplexity, token_nll, token_windows
from .sweep import SweepPoint, run_sweep
from .zero_shot import record_zero_shot, zero_shot, zero_shot_entry

__all__ = [
    "BenchResult",
    "SweepPoint",
    "benchmark",
    "compare",
    "perplexity",
    "record_zero_shot",
    "run_sweep",
    "token_nll",
    "token_windows",
    "zero_shot",
    "zero_shot_entry",
]
