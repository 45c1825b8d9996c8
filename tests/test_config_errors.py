"""Every bad input raises ``ValueError`` naming the bad value and what is allowed, and as early as it can be known.

The inputs that need no saved checkpoint (config fields, options, calibration sources) are the table in
``test_bad_inputs.py``; this file keeps those that must also fail before prune on load reads any weight.

Errors that need the model (architecture, shapes) are checked both through :func:`hf_sparse.prune` and through prune
on load, where they must fire before any weight is read.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_sparse
from conftest import refuse_weight_loading, tiny_llama
from hf_sparse import SparsityConfig


def _ids(samples: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# Errors that need the model or the data: through prune() and through prune on load (before the weights load)


def test_unsupported_architecture(tmp_path, monkeypatch):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=True))
    expected = r"does not know the layout of model_type 'bert' \(BertLMHeadModel\).*'llama'.*register_architecture"
    with pytest.raises(ValueError, match=expected):
        hf_sparse.prune(model, SparsityConfig(method="magnitude"), show_progress=False)
    model.save_pretrained(tmp_path)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=SparsityConfig(method="magnitude"))


def _fails_on_prune_and_before_loading(cfg, expected: str, tmp_path, monkeypatch, **prune_kwargs) -> None:
    """The same ValueError from ``hf_sparse.prune`` and from prune on load, before any weight is read."""
    with pytest.raises(ValueError, match=expected):
        hf_sparse.prune(tiny_llama(), cfg, show_progress=False, **prune_kwargs)
    tiny_llama().save_pretrained(tmp_path / "model")
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=cfg)


def test_missing_calibration_for_wanda(tmp_path, monkeypatch):
    expected = r"method 'wanda' needs calibration data: set SparsityConfig\(calibration=...\)"
    _fails_on_prune_and_before_loading(SparsityConfig(method="wanda"), expected, tmp_path, monkeypatch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, monkeypatch):
    expected = r"device='cuda' was requested but CUDA is not available here; use device='cpu'"
    _fails_on_prune_and_before_loading(SparsityConfig(method="magnitude", device="cuda"), expected, tmp_path,
                                       monkeypatch)


def test_n_m_pattern_that_does_not_tile_in_features(tmp_path, monkeypatch):
    # intermediate_size 132 is not a multiple of 8: only down_proj, pruned last in each block, cannot take 4:8.
    model = tiny_llama(intermediate_size=132)
    cfg = SparsityConfig(method="wanda", pattern="4:8", calibration=_ids(), num_samples=4, sequence_length=16)
    expected = (r"pattern '4:8' needs in_features to be a multiple of 8, but module "
                r"'model.layers.0.mlp.down_proj' has in_features=132; leave it out with exclude=")
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=expected):
        hf_sparse.prune(model, cfg, show_progress=False)
    # Checked before anything is pruned: the attention projections pruned earlier in the pass are untouched.
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=cfg)


def test_calibration_path_that_does_not_exist(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-calibration.txt")
    cfg = SparsityConfig(method="wanda", calibration=missing, num_samples=4, sequence_length=16)
    expected = rf"calibration path '{re.escape(missing)}' does not exist"
    # tokenizer=object(): it fails before tokenizing
    _fails_on_prune_and_before_loading(cfg, expected, tmp_path, monkeypatch, tokenizer=object())


def test_include_matching_nothing(tmp_path, monkeypatch):
    cfg = SparsityConfig(method="magnitude", include=["no_such_module"])
    expected = r"no linear module matched include=\['no_such_module'\]"
    _fails_on_prune_and_before_loading(cfg, expected, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# JSON round trip


def test_json_round_trip_keeps_options_and_drops_data():
    texts = ["secret calibration text number one", "and a second secret one"]
    cfg = SparsityConfig(method="sparsegpt", pattern="4:8", include=[r"mlp\."], exclude=["down_proj"],
                         calibration=texts, num_samples=16, sequence_length=64, batch_size=2, seed=3,
                         method_options={"block_size": 64}, tokenizer=object())
    data = cfg.to_dict()
    text = json.dumps(data)  # JSON-safe
    assert "secret" not in text and "tokenizer" not in data
    assert data["calibration"]["kind"] == "texts" and data["calibration"]["count"] == 2
    back = SparsityConfig.from_dict(json.loads(text))
    assert back.to_dict() == data
    for field in ("method", "pattern", "sparsity", "include", "exclude", "num_samples", "sequence_length",
                  "batch_size", "seed", "method_options"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert back.calibration is None and back.tokenizer is None  # the data itself is not in JSON


def test_json_round_trip_of_a_named_calibration_source():
    cfg = SparsityConfig(method="wanda", calibration="wikitext", calibration_subset="wikitext-2-raw-v1")
    back = SparsityConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.calibration == "wikitext" and back.calibration_subset == "wikitext-2-raw-v1"  # can calibrate again
