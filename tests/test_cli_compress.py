"""``hf-sparse compress`` / ``decompress`` / ``prune --compressed`` on a tiny pruned Llama."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import hf_sparse
from conftest import save_tiny_with_demo_tokenizer, tiny_llama
from hf_sparse.cli import main


def _pruned_dir(path):
    model = tiny_llama(seed=0)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    model.half().save_pretrained(path)
    return model.half()


def test_compress_then_decompress_round_trip(tmp_path, capsys):
    model = _pruned_dir(tmp_path / "pruned")
    assert main(["compress", str(tmp_path / "pruned"), str(tmp_path / "compact")]) == 0
    out = capsys.readouterr().out
    assert "0.7" in out or "x dense" in out
    assert json.loads((tmp_path / "compact" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "hf_sparse_compact"
    assert main(["decompress", str(tmp_path / "compact"), str(tmp_path / "dense")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_compress_refuses_an_existing_output_with_exit_code_2(tmp_path, capsys):
    _pruned_dir(tmp_path / "pruned")
    (tmp_path / "taken").mkdir()
    assert main(["compress", str(tmp_path / "pruned"), str(tmp_path / "taken")]) == 2
    assert "already exists; choose a new folder or pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "pruned"), str(tmp_path / "pruned")]) == 2  # the input itself
    assert "is the input IN" in capsys.readouterr().err


def test_prune_compressed_writes_compact_storage(tmp_path):
    save_tiny_with_demo_tokenizer(tmp_path / "dense")
    assert main(["prune", str(tmp_path / "dense"), "--method", "magnitude", "--pattern", "2:4", "--dtype", "float16",
                 "--output", str(tmp_path / "out"), "--compressed", "--no-model-card"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["sparsity_config"]["storage"]["encodings"] == {"n:m": 14}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf_sparse.get_masks(loaded).keys() == set(config["sparsity_config"]["modules"])


def test_model_card_of_a_compressed_checkpoint_states_its_size_against_dense(tmp_path):
    save_tiny_with_demo_tokenizer(tmp_path / "dense")
    assert main(["prune", str(tmp_path / "dense"), "--method", "magnitude", "--pattern", "2:4", "--dtype", "float16",
                 "--output", str(tmp_path / "out"), "--compressed"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    storage = json.loads((tmp_path / "out" / "config.json").read_text())["sparsity_config"]["storage"]
    assert storage["format"] == "hf_sparse_compact" and storage["version"] == 1
    ratio = storage["stored_bytes"] / storage["dense_bytes"]
    row = next(line for line in card.splitlines() if line.startswith("| Storage |"))
    assert "`hf_sparse_compact` version 1" in row and f"{ratio:.3f} of the" in row and "14 matrices in N:M form" in row
    assert "hf-sparse decompress" in card and "exact zeros in ordinary dense tensors" not in card
