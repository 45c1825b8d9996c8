"""The real pretrained test-bed, SmolLM2-135M-Instruct (hf_sparse.testbed), and pruning its GGUF file on load.

Kept short for CI: 16 calibration windows of 128 tokens, perplexity over the first 8 windows of 256 tokens of the
WikiText-2 test split, one or two methods per test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sparse
from conftest import CALIBRATION_TXT
from hf_sparse import testbed
from hf_sparse.integrations.gguf import file_sha256
from hf_sparse.masks import is_valid_n_m

pytestmark = pytest.mark.slow


def assert_half_sparse(record) -> None:
    # Exactly half pruned, plus the few weights that dequantize from 4 bits to an exact zero of their own.
    assert 0.5 <= record.overall_sparsity < 0.5001, record.overall_sparsity
WINDOWS = 8
CALIBRATION = dict(calibration=str(CALIBRATION_TXT), num_samples=16, sequence_length=128, seed=0)


@pytest.fixture(scope="module")
def testbed_tokenizer(testbed_dir):
    return AutoTokenizer.from_pretrained(testbed_dir)


@pytest.fixture(scope="module")
def evaluate(testbed_tokenizer, heldout_text):
    def run(model) -> float:
        return hf_sparse.evaluate.perplexity(model, testbed_tokenizer, heldout_text, sequence_length=256,
                                             batch_size=4, max_windows=WINDOWS, show_progress=False)
    return run


def load(testbed_dir):
    return AutoModelForCausalLM.from_pretrained(testbed_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return testbed.find_testbed_gguf()
    except testbed.TestbedUnavailable as error:
        pytest.skip(str(error))


def test_dense_testbed_knows_paris_and_has_its_perplexity(testbed_dir, testbed_tokenizer, evaluate):
    model = load(testbed_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    provenance = json.loads((testbed_dir / testbed.PROVENANCE_FILE).read_text())
    assert provenance["gguf_file"] == testbed.GGUF_FILE and len(provenance["gguf_sha256"]) == 64
    prompt = testbed_tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in testbed_tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
    # 33.94 over the first 64 windows (../shared/ASSETS.md); the first 8 alone land near it.
    assert 20 < evaluate(model) < 50


def test_wanda_and_sparsegpt_2of4_beat_magnitude(testbed_dir, testbed_tokenizer, evaluate):
    perplexities = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = load(testbed_dir)
        cfg = hf_sparse.SparsityConfig(method=method, pattern="2:4", **CALIBRATION)
        assert_half_sparse(hf_sparse.prune(model, cfg, tokenizer=testbed_tokenizer, show_progress=False))
        perplexities[method] = evaluate(model)
    assert all(math.isfinite(value) for value in perplexities.values())
    # On this model 2:4 magnitude costs ~40x dense; calibration-aware methods keep a fraction of that loss.
    assert perplexities["sparsegpt"] < perplexities["wanda"] < perplexities["magnitude"], perplexities


def _assert_plain_pruned_checkpoint(folder, gguf_file, model):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    record = config["sparsity_config"]
    assert record["base_model"] == testbed.GGUF_FILE  # the file's name, never the folder it was read from
    assert record["base_model_sha256"] == file_sha256(gguf_file)
    assert any(folder.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.arange(100, 132).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    return reloaded


def test_gguf_prune_on_load_saves_and_reloads(gguf_file, tmp_path):
    cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration=str(CALIBRATION_TXT), num_samples=4,
                                   sequence_length=64)  # text calibration: the tokenizer comes from the GGUF file
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                 sparsity_config=cfg)
    assert not hasattr(model, "hf_quantizer")
    record = hf_sparse.read_record(model)
    assert_half_sparse(record)
    for name in record.modules:
        assert is_valid_n_m(model.get_submodule(name).weight, 2, 4), name
    model.save_pretrained(tmp_path / "pruned")
    reloaded = _assert_plain_pruned_checkpoint(tmp_path / "pruned", gguf_file, model)
    assert hf_sparse.read_record(reloaded) == record


def test_prune_after_a_gguf_load_leaves_the_model_savable(gguf_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):  # transformers' own refusal, before pruning
        model.save_pretrained(tmp_path / "dense")
    record = hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    assert record.base_model == testbed.GGUF_FILE
    model.save_pretrained(tmp_path / "pruned")
    _assert_plain_pruned_checkpoint(tmp_path / "pruned", gguf_file, model)
