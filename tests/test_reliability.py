"""Nothing silent: changed configs, untrusted checkpoints and records, pruning twice, and no local paths published.

Each test here failed before the fix it names (issue 12, items 5-8 and 10) and passes now.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_sparse
from conftest import DEMO_CALIBRATION, refuse_weight_loading, save_tiny_with_demo_tokenizer, tiny_llama
from hf_sparse import SparsityConfig
from hf_sparse.calibration import content_sha256


def _ids(samples: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(0))


def _sparsity(model, name: str) -> float:
    weight = dict(model.named_modules())[name].weight
    return float((weight == 0).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# 5. A config changed after construction is validated when it is used


def test_mutated_config_is_refused_by_prune():
    cfg = SparsityConfig(method="magnitude")
    cfg.sparsity = 1.5
    model = tiny_llama()
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        hf_sparse.prune(model, cfg, show_progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # nothing was zeroed


def test_mutated_method_option_is_refused_by_prune():
    cfg = SparsityConfig(method="sparsegpt", calibration=_ids(), num_samples=4, sequence_length=16)
    cfg.method_options["dampening"] = "0.5"
    with pytest.raises(ValueError, match=r"sparsegpt dampening must be a number in \(0, 1\), got '0.5' \(str\)"):
        hf_sparse.prune(tiny_llama(), cfg, show_progress=False)


def test_mutated_config_is_refused_before_loading(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path)
    cfg = SparsityConfig(method="magnitude")
    cfg.pattern = "2:4"
    cfg.sparsity = 0.7
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"sparsity 0.7 contradicts pattern '2:4'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=cfg)


# ---------------------------------------------------------------------------------------------------------------
# 6. An untrusted checkpoint's quantization_config does not cancel the caller's pruning


@pytest.fixture
def checkpoint_claiming_hf_sparse(tmp_path):
    path = tmp_path / "untrusted"
    tiny_llama().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hf_sparse"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("entry", ["hook", "auto_sparse", "quantization_config"])
def test_callers_config_wins_over_the_checkpoints(checkpoint_claiming_hf_sparse, entry):
    cfg = SparsityConfig(method="magnitude", sparsity=0.7)
    if entry == "hook":
        model = AutoModelForCausalLM.from_pretrained(checkpoint_claiming_hf_sparse, sparsity_config=cfg)
    elif entry == "auto_sparse":
        model = hf_sparse.AutoSparseModelForCausalLM.from_pretrained(checkpoint_claiming_hf_sparse,
                                                                     sparsity_config=cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_claiming_hf_sparse, quantization_config=cfg)
    record = hf_sparse.read_record(model)
    assert record.target_sparsity == 0.7 and record.overall_sparsity == pytest.approx(0.7, abs=1e-3)
    assert _sparsity(model, "model.layers.0.mlp.up_proj") == pytest.approx(0.7, abs=1e-3)
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None


# ---------------------------------------------------------------------------------------------------------------
# 7. Every field of a record read from config.json is validated; get_masks(strict=True) checks N:M patterns


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pruned")
    model = tiny_llama()
    hf_sparse.prune(model, SparsityConfig(method="magnitude", sparsity=0.5), show_progress=False)
    model.save_pretrained(path)
    return path


def _tampered(pruned_dir, tmp_path, **changes):
    path = tmp_path / "tampered"
    shutil.copytree(pruned_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["sparsity_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes,expected", [
    ({"overall_sparsity": None}, r"sparsity_config.overall_sparsity must be a number in \[0, 1\], got None"),
    ({"overall_sparsity": "0.5"}, r"sparsity_config.overall_sparsity must be a number in \[0, 1\], got '0.5'"),
    ({"overall_sparsity": 1.5}, r"sparsity_config.overall_sparsity must be in \[0, 1\], got 1.5"),
    ({"evaluation": {"pruned_perplexity": "low"}}, r"sparsity_config.evaluation.pruned_perplexity must be a number"),
    ({"evaluation": {"eval_sequence_length": "long"}},
     r"sparsity_config.evaluation.eval_sequence_length must be a positive integer or None, got 'long'"),
    ({"evaluation": [1, 2]}, r"sparsity_config.evaluation must be an object"),
    ({"calibration": {"kind": "texts", "num_samples": "many"}},
     r"sparsity_config.calibration.num_samples must be a positive integer or None, got 'many'"),
    ({"calibration": {"kind": "mystery"}}, r"sparsity_config.calibration.kind must be one of"),
    ({"calibration": {"kind": "file", "name": "/home/me/secret.txt"}},
     r"sparsity_config.calibration.name must be a name, not an absolute local path"),
    ({"calibration": "calibration.txt"}, r"sparsity_config.calibration must be an object"),
    ({"method_options": {"per_row": "sometimes"}}, r"sparsity_config.method_options: magnitude per_row must be True"),
    ({"base_model": 7}, r"sparsity_config.base_model must be a string or None, got 7"),
    ({"recovery": {"rank": -1}}, r"sparsity_config.recovery.rank must be a positive integer or None, got -1"),
    ({"target_sparsity": True}, r"sparsity_config.target_sparsity must be a number in \[0, 1\), got True"),
    ({"modules": {}}, r"sparsity_config.modules must be a non-empty object"),
    ({"passes": [{"method": "magnitude"}]}, r"sparsity_config.passes\[0\].pattern is missing"),
    ({"surprise": 1}, r"sparsity_config has unknown key\(s\) \['surprise'\]"),
])
def test_every_record_field_is_validated(pruned_dir, tmp_path, changes, expected):
    path = _tampered(pruned_dir, tmp_path, **changes)
    with pytest.raises(ValueError, match=expected):
        hf_sparse.read_record(AutoConfig.from_pretrained(path))


def test_record_claiming_2_4_on_unstructured_weights_is_refused(pruned_dir, tmp_path):
    path = _tampered(pruned_dir, tmp_path, pattern="2:4")
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[a-z_.]+' does not follow the pattern "
                                         r"'2:4' its record claims"):
        hf_sparse.get_masks(model, strict=True)
    assert len(hf_sparse.get_masks(model, strict=False)) == 14  # not strict: the zeros as they are


def test_version_1_record_with_a_local_path_is_still_readable(pruned_dir, tmp_path):
    path = _tampered(pruned_dir, tmp_path, calibration={"kind": "name_or_path", "name": "/data/calibration.txt"},
                     base_model="/models/llama")
    record = hf_sparse.read_record(AutoModelForCausalLM.from_pretrained(path))
    assert record.calibration["name"] == "/data/calibration.txt" and record.to_dict()["format_version"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 8. Pruning twice merges the records


def test_pruning_twice_with_different_include_merges_the_records(tmp_path):
    model = tiny_llama()
    first = hf_sparse.prune(model, SparsityConfig(method="magnitude", pattern="2:4", include=[r"mlp\."]),
                            show_progress=False)
    assert first.to_dict()["format_version"] == 1 and "passes" not in first.to_dict()
    second = hf_sparse.prune(model, SparsityConfig(method="magnitude", sparsity=0.3, include=[r"self_attn\."]),
                             show_progress=False)
    assert set(second.modules) == set(first.modules) | {n for n in second.modules if "self_attn" in n}
    assert len(second.modules) == 14
    assert [(p["method"], p["pattern"], p["target_sparsity"], len(p["modules"])) for p in second.passes] == [
        ("magnitude", "2:4", 0.5, 6), ("magnitude", "unstructured", 0.3, 8)]
    zeros = sum(int((dict(model.named_modules())[n].weight == 0).sum()) for n in second.modules)
    total = sum(dict(model.named_modules())[n].weight.numel() for n in second.modules)
    assert second.overall_sparsity == pytest.approx(zeros / total, abs=1e-6)
    masks = hf_sparse.get_masks(model)  # strict: 2:4 checked on the MLP only, where the first pass put it
    assert set(masks) == set(second.modules)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["sparsity_config"]
    assert saved["format_version"] == 2 and len(saved["passes"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(hf_sparse.get_masks(reloaded)) == set(second.modules)


def test_mask_keeper_sees_both_passes():
    from hf_sparse.training import MaskKeeper

    model = tiny_llama()
    hf_sparse.prune(model, SparsityConfig(method="magnitude", include=[r"mlp\."]), show_progress=False)
    hf_sparse.prune(model, SparsityConfig(method="magnitude", include=[r"self_attn\."]), show_progress=False)
    keeper = MaskKeeper(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # what dense training does to the zeros
    keeper.apply()
    assert _sparsity(model, "model.layers.0.mlp.up_proj") == pytest.approx(0.5, abs=1e-3)  # first pass
    assert _sparsity(model, "model.layers.0.self_attn.q_proj") == pytest.approx(0.5, abs=1e-3)  # second pass


# ---------------------------------------------------------------------------------------------------------------
# 10. No absolute local path in the record


def test_record_names_local_files_by_base_name_and_hash(tmp_path):
    secret = tmp_path / "secret-customer-corpus.txt"
    secret.write_text(DEMO_CALIBRATION.read_text(encoding="utf-8"), encoding="utf-8")
    model_dir = save_tiny_with_demo_tokenizer(tmp_path / "my-private-models" / "base")
    cfg = SparsityConfig(method="wanda", calibration=str(secret), num_samples=2, sequence_length=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, sparsity_config=cfg)
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "config.json").read_text()
    assert str(tmp_path) not in text and "my-private-models" not in text
    record = json.loads(text)["sparsity_config"]
    assert record["calibration"] == {"kind": "file", "name": "secret-customer-corpus.txt",
                                     "sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
                                     "num_samples": 2, "sequence_length": 16, "seed": 0}
    assert record["base_model"] == "base" and record["base_model_sha256"] == content_sha256(model_dir)


def test_calibration_folder_is_hashed_and_a_dataset_keeps_its_name(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "b.txt").write_text("second")
    described = hf_sparse.calibration.describe_calibration(str(folder))
    assert described["kind"] == "folder" and described["name"] == "corpus"
    (folder / "b.txt").write_text("changed")
    assert hf_sparse.calibration.describe_calibration(str(folder))["sha256"] != described["sha256"]
    assert hf_sparse.calibration.describe_calibration("Salesforce/wikitext") == {
        "kind": "name_or_path", "name": "Salesforce/wikitext"}


def test_hub_id_base_model_stays_an_id():
    model = tiny_llama()
    model.name_or_path = "org/some-model"
    record = hf_sparse.prune(model, SparsityConfig(method="magnitude"), show_progress=False)
    assert record.base_model == "org/some-model" and record.base_model_sha256 is None


# ---------------------------------------------------------------------------------------------------------------
# Errors that must come before the weights load


def test_text_calibration_for_a_folder_without_tokenizer_fails_before_loading(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "no-tokenizer")
    cfg = SparsityConfig(method="wanda", calibration=["some text"] * 4, num_samples=2, sequence_length=8)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"text calibration needs a tokenizer, and none could be loaded from "
                                         r"'no-tokenizer'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "no-tokenizer", sparsity_config=cfg)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sequence_length_beyond_the_context_fails_before_loading(tmp_path, monkeypatch, family):
    if family == "llama":
        model = tiny_llama(max_position_embeddings=32)
    else:
        from transformers import OPTConfig, OPTForCausalLM

        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32))
    cfg = SparsityConfig(method="wanda", calibration=_ids(4, 64), num_samples=4, sequence_length=64)
    expected = r"sequence_length=64 is longer than the model's context \(max_position_embeddings=32\)"
    with pytest.raises(ValueError, match=expected):
        hf_sparse.prune(model, cfg, show_progress=False)
    model.save_pretrained(tmp_path)
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=cfg)
