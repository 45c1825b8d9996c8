"""Exported GGUF files in the real llama.cpp (binaries from $HF_SPARSE_LLAMA_CPP_BIN, else PATH; skipped with the
build command when absent): llama-tokenize gives transformers' ids (the demo tokenizer, its pre-tokenizer variants,
SmolLM2's real tokenizer), and llama-perplexity's log-probabilities and perplexity match transformers on the same
tokens for dense, per-block (deci), uniform and layer-removed models (the demo model; the 7M model in a slow test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import hf_sparse
from conftest import (CALIBRATION_TXT, DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL, MODEL_DIR, TEST_TXT,
                      import_example)

gguf = pytest.importorskip("gguf")
bench = import_example("benchmark_llamacpp")
TEXT = ("Hello world, it's 2026!  Numbers 12345 and   spaces\n\nNew line.\tTabs; café, naïve — “quotes” "
        "<s> and </s> 3.14159 don't I'M we'll\n  indented")


def _binary(name: str):
    found = bench.find_binary(name)
    if found is None:
        pytest.skip(f"llama.cpp's {name} not found in ${bench.ENV_VAR} or on PATH; build it: {bench.BUILD_COMMAND}")
    return found


def _load_demo():
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


def _prune(model, tokenizer, method, sparsity, calibration=DEMO_CALIBRATION, samples=8, length=128, **options):
    config = hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity,
                                      calibration=str(calibration), num_samples=samples, sequence_length=length,
                                      seed=0, method_options=options)
    hf_sparse.prune(model, config, tokenizer=tokenizer, show_progress=False)
    return model


def _reference_logprobs(model, ids: np.ndarray) -> np.ndarray:
    first = ids.shape[1] // 2
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits[:, first:-1].double()
    return torch.log_softmax(logits, -1).numpy()


# -- tokenization ----------------------------------------------------------------------------------------------------

def _tokenizer_with(pre_tokenizer: dict | None = None, ignore_merges: bool = False, folder=None):
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if pre_tokenizer is not None:
        data["pre_tokenizer"] = pre_tokenizer
    data["model"]["ignore_merges"] = ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def _split(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


@pytest.mark.parametrize("variant", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_tokenize_gives_transformers_ids(tmp_path, variant):
    from hf_sparse.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT

    binary = _binary("llama-tokenize")
    pre = {"gpt-2": None,
           "smollm": {"type": "Sequence", "pretokenizers": [
               {"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
           "llama-bpe": _split(_LLAMA3_SPLIT), "qwen2": _split(_QWEN2_SPLIT)}[variant]
    tokenizer = _tokenizer_with(pre, ignore_merges=variant == "llama-bpe", folder=tmp_path)
    path = hf_sparse.export_gguf(_load_demo(), tmp_path / "t.gguf", tokenizer=tokenizer, show_progress=False)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == variant
    text = TEXT + "\n" + DEMO_HELDOUT.read_text(encoding="utf-8")[:3000]
    assert bench.llamacpp_tokens(binary, path, text) == tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_llama_tokenize_gives_transformers_ids_for_smollm2(tmp_path, testbed_dir):
    binary = _binary("llama-tokenize")
    tokenizer = transformers.AutoTokenizer.from_pretrained(testbed_dir)
    config = transformers.AutoConfig.from_pretrained(testbed_dir)
    torch.manual_seed(0)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))  # SmolLM2's vocabulary, tiny body
    path = hf_sparse.export_gguf(small, tmp_path / "smol.gguf", tokenizer=tokenizer, show_progress=False)
    fields = gguf.GGUFReader(path).fields
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    text = TEXT + "<|im_start|>user\nHi<|im_end|>\n" + TEST_TXT.read_text(encoding="utf-8")[:5000]
    assert bench.llamacpp_tokens(binary, path, text) == tokenizer(text)["input_ids"]


# -- the model's outputs ---------------------------------------------------------------------------------------------

def _demo_variants(tokenizer):
    yield "dense", "llama", _load_demo()
    yield "flap-per-block", "deci", _prune(_load_demo(), tokenizer, "flap", 0.3)
    yield "flap-uniform", "llama", _prune(_load_demo(), tokenizer, "flap", 0.3, uniform_shapes=True)
    yield "shortgpt", "llama", _prune(_load_demo(), tokenizer, "shortgpt", 0.34)


def test_llamacpp_log_probabilities_and_perplexity_match_transformers(tmp_path):
    binary = _binary("llama-perplexity")
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = DEMO_HELDOUT.read_text(encoding="utf-8")
    for name, arch, model in _demo_variants(tokenizer):
        path = hf_sparse.export_gguf(model, tmp_path / f"{name}.gguf", tokenizer=tokenizer, show_progress=False)
        assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch, name
        ids, logprobs = bench.llamacpp_logprobs(binary, path, DEMO_HELDOUT, context=64, chunks=2)
        assert ids.reshape(-1).tolist() == tokenizer(text, split_special_tokens=True)["input_ids"][:128]
        reference = _reference_logprobs(model, ids)
        top = np.argsort(-reference, -1)[..., :10]  # the log-probabilities that matter
        gap = np.abs(np.take_along_axis(logprobs, top, -1) - np.take_along_axis(reference, top, -1)).max()
        assert gap < 0.02, (name, gap)
        ours = bench.reference_perplexity(model, tokenizer, text, 128, 4)
        theirs = bench.llamacpp_perplexity(binary, path, DEMO_HELDOUT, 128, 4)
        assert abs(theirs / ours - 1) < 0.01, (name, ours, theirs)


def test_qwen2_and_its_deci_export_match_transformers(tmp_path):
    binary = _binary("llama-perplexity")
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).eval()
    with torch.no_grad():  # sharper attention than the random init, so rotary mistakes would show
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # q/k/v biases start at zero: make them count
                parameter.normal_(0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                parameter.mul_(4)
    models = {"qwen2": model}
    pruned = transformers.Qwen2ForCausalLM(model.config).eval()
    pruned.load_state_dict(model.state_dict())
    _prune(pruned, tokenizer, "flap", 0.3, samples=4, length=64)
    models["deci"] = pruned
    for arch, candidate in models.items():
        path = hf_sparse.export_gguf(candidate, tmp_path / f"{arch}.gguf", tokenizer=tokenizer, show_progress=False)
        assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch
        ids, logprobs = bench.llamacpp_logprobs(binary, path, DEMO_HELDOUT, context=64, chunks=1)
        reference = _reference_logprobs(candidate, ids)
        top = np.argsort(-reference, -1)[..., :10]
        gap = np.abs(np.take_along_axis(logprobs, top, -1) - np.take_along_axis(reference, top, -1)).max()
        assert gap < 0.02, (arch, gap)


@pytest.mark.slow
def test_pruned_7m_model_runs_in_llamacpp_within_one_percent(tmp_path):
    binary = _binary("llama-perplexity")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    text = TEST_TXT.read_text(encoding="utf-8")
    for name, method, sparsity in (("flap-per-block", "flap", 0.3), ("shortgpt", "shortgpt", 0.2)):
        model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
        _prune(model, tokenizer, method, sparsity, calibration=CALIBRATION_TXT, samples=16, length=256)
        folder = hf_sparse.saving.save_checkpoint(model, tokenizer, tmp_path / name)
        path = hf_sparse.export_gguf(folder, tmp_path / f"{name}.gguf", show_progress=False)
        ours = bench.reference_perplexity(model, tokenizer, text, 256, 8)
        theirs = bench.llamacpp_perplexity(binary, path, TEST_TXT, 256, 8)
        assert abs(theirs / ours - 1) < 0.01, (name, ours, theirs)
