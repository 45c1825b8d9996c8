"""Quality on the real pretrained model (../shared): calibrated on the WikiText-2 validation text, evaluated on the
held-out test split, the same windows for every method."""

from __future__ import annotations

import math

import pytest
import torch

import hf_sparse
from conftest import CALIBRATION_TXT, load_pretrained

pytestmark = pytest.mark.slow
WINDOWS = 100  # first 100 non-overlapping 256-token windows of the test split


@pytest.fixture(scope="module")
def evaluate(tokenizer, heldout_text):
    def run(model):
        return hf_sparse.evaluate.perplexity(model, tokenizer, heldout_text, sequence_length=256, batch_size=25,
                                             max_windows=WINDOWS, show_progress=False)
    return run


@pytest.fixture(scope="module")
def pruned_perplexity(tokenizer, evaluate):
    cache = {}

    def run(method, pattern, sparsity=None):
        key = (method, pattern, sparsity)
        if key not in cache:
            model = load_pretrained()
            cfg = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=sparsity,
                                           calibration=str(CALIBRATION_TXT), num_samples=32, sequence_length=256)
            record = hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
            assert record.overall_sparsity == pytest.approx(cfg.sparsity, abs=1e-6)
            cache[key] = evaluate(model)
        return cache[key]
    return run


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_method_ordering(pattern, pruned_perplexity, evaluate):
    dense = evaluate(load_pretrained())
    magnitude = pruned_perplexity("magnitude", pattern)
    wanda = pruned_perplexity("wanda", pattern)
    sparsegpt = pruned_perplexity("sparsegpt", pattern)
    for value in (magnitude, wanda, sparsegpt):
        assert math.isfinite(value) and value > dense
    assert sparsegpt <= wanda < magnitude, (dense, magnitude, wanda, sparsegpt)


def test_pruning_is_deterministic(tokenizer):
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", pattern="2:4", calibration=str(CALIBRATION_TXT),
                                   num_samples=8, sequence_length=128, seed=3)
    weights = []
    for _ in range(2):
        model = load_pretrained()
        hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
        weights.append(model.model.layers[3].mlp.down_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
