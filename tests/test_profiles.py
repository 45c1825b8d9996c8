"""Sparsity profiles: OWL's ratio function on hand-checkable numbers, exact overall sparsity on a tiny model, explicit
profiles by block index and regular expression, the record, the refusals, and the CLI flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hf_sparse
from conftest import MODEL_DIR, TEST_TXT, CALIBRATION_TXT, refuse_weight_loading, tiny_llama
from hf_sparse.config.profiles import OwlOptions, outlier_ratio, owl_block_sparsities
from hf_sparse.engine import LayerwiseEngine
from hf_sparse.masks import SparsityPattern
from hf_sparse.methods import build_method
from hf_sparse.record import SparsityRecord

CALIBRATION = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}


# -- the math -----------------------------------------------------------------------------------------------------

def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    # mean 3, so the threshold is 6 at m=2: only the 9 is above.
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 9.0]), 2.0) == 0.25
    # at m=1 the threshold is the mean itself: strictly above it counts
    assert outlier_ratio(torch.tensor([[1.0, 3.0], [3.0, 5.0]]), 1.0) == 0.25


def test_owl_ratios_equal_sizes_are_the_papers_formula():
    # D normalised to [0, 2λ] = [0, 0.1, 0.2], mean 0.1: sparsity 0.5 - (n - 0.1)
    assert owl_block_sparsities([1.0, 2.0, 3.0], [10, 10, 10], 0.5, 0.1) == [0.6, 0.5, 0.4]
    # more outliers, fewer pruned; a permutation of D permutes the answer
    assert owl_block_sparsities([3.0, 1.0, 2.0], [10, 10, 10], 0.5, 0.1) == [0.4, 0.6, 0.5]


def test_owl_ratios_weight_the_shift_by_block_size():
    # normalised [0, 0.1, 0.2], size-weighted mean (0 + 0.1 + 2·0.2) / 4 = 0.125
    values = owl_block_sparsities([1.0, 2.0, 3.0], [1, 1, 2], 0.5, 0.1)
    assert values == [0.625, 0.525, 0.425]
    assert math.isclose(sum(v * n for v, n in zip(values, [1, 1, 2])), 0.5 * 4)


def test_owl_ratios_without_spread_or_lambda_are_uniform():
    assert owl_block_sparsities([2.0, 2.0], [3, 5], 0.7, 0.08) == [0.7, 0.7]
    assert owl_block_sparsities([1.0, 9.0], [3, 5], 0.7, 0.0) == [0.7, 0.7]


def test_owl_ratios_outside_zero_one_are_refused_not_clamped():
    with pytest.raises(ValueError, match=r"block 0 sparsity .* use a smaller lambda"):
        owl_block_sparsities([1.0, 2.0], [1, 1], 0.9, 0.2)


def test_owl_options_validated_with_the_papers_names():
    assert OwlOptions.from_dict({"m": 7, "lambda": 0.1}).to_dict() == {"m": 7.0, "lambda": 0.1}
    with pytest.raises(ValueError, match="lambda must be"):
        OwlOptions.from_dict({"lambda": 0.9})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['M'\]"):
        OwlOptions.from_dict({"M": 5})


# -- config ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sparsity_profile="fancy"), "sparsity_profile must be one of"),
    (dict(sparsity_profile={"mlp": 1.2}), r"sparsity_profile\['mlp'\] must be in \[0, 1\)"),
    (dict(sparsity_profile={"(": 0.5}), "not a valid regular expression"),
    (dict(sparsity_profile="uniform", profile_options={"m": 5}), "takes no options"),
    (dict(sparsity_profile="owl", pattern="2:4"), "per-block N:M .* is not supported"),
])
def test_bad_profiles_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        hf_sparse.SparsityConfig(method="wanda", **kwargs)


def test_profile_round_trips_through_to_dict():
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", sparsity=0.7, sparsity_profile="owl",
                                   profile_options={"lambda": 0.05})
    back = hf_sparse.SparsityConfig.from_dict(cfg.to_dict())
    assert back.sparsity_profile == "owl" and back.profile_options == {"m": 5.0, "lambda": 0.05}


# -- on a tiny model --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "fista"])
def test_owl_overall_sparsity_is_the_target_with_unequal_blocks(method):
    model = tiny_llama(num_hidden_layers=3)
    # Block 0 without its MLP: the blocks' pruned sizes differ, so a plain mean over blocks would miss the target.
    cfg = hf_sparse.SparsityConfig(method=method, sparsity=0.6, sparsity_profile="owl",
                                   profile_options={"m": 2, "lambda": 0.1}, exclude=[r"layers\.0\.mlp"],
                                   calibration=CALIBRATION, num_samples=8, sequence_length=16, batch_size=4)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    linears = _linears(model)
    pruned = {name: linears[name] for name in record.modules}
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.values())
    total = sum(m.weight.numel() for m in pruned.values())
    # Exact to the rounding of one weight per matrix.
    assert abs(zeros - 0.6 * total) <= len(pruned)
    blocks = record.sparsity_profile["block_sparsity"]
    assert len(set(blocks.values())) == 3 and max(blocks.values()) - min(blocks.values()) <= 0.2 + 1e-6
    for name, target in record.target_modules.items():  # every module at its own target, to one weight
        assert abs(record.modules[name] - target) <= 1.0 / pruned[name].weight.numel() + 1e-6
    # More outliers, fewer pruned.
    ratios = record.sparsity_profile["block_outlier_ratio"]
    order = sorted(ratios, key=ratios.get)
    assert [blocks[i] for i in order] == sorted(blocks.values(), reverse=True)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "fista"])
def test_owl_through_from_pretrained_matches_prune(method, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "model")
    cfg = dict(method=method, sparsity=0.6, sparsity_profile="owl", profile_options={"m": 2, "lambda": 0.1},
               calibration=CALIBRATION, num_samples=8, sequence_length=16, batch_size=4)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model",
                                                  sparsity_config=hf_sparse.SparsityConfig(**cfg))
    record = loaded.config.sparsity_config
    assert record["sparsity_profile"]["name"] == "owl" and len(record["target_modules"]) == 21
    assert abs(record["overall_sparsity"] - 0.6) < 1e-3
    # The same targets and weights as pruning the loaded dense model.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    expected = hf_sparse.prune(reference, hf_sparse.SparsityConfig(**cfg), show_progress=False)
    assert record["target_modules"] == expected.target_modules
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), reference.parameters()))


def test_owl_with_parallel_fista_equals_sequential():
    common = dict(method="fista", sparsity=0.6, sparsity_profile="owl", profile_options={"m": 2, "lambda": 0.1},
                  calibration=CALIBRATION, num_samples=8, sequence_length=16, batch_size=4)
    a, b = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    record_a = hf_sparse.prune(a, hf_sparse.SparsityConfig(**common), show_progress=False)
    record_b = hf_sparse.prune(b, hf_sparse.SparsityConfig(**common, parallel=True, num_workers=2),
                               show_progress=False)
    assert record_a.target_modules == record_b.target_modules
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_uniform_profile_is_bit_identical_and_keeps_the_record_shape():
    a, b = tiny_llama(), tiny_llama()
    common = dict(method="wanda", sparsity=0.5, calibration=CALIBRATION, num_samples=8, sequence_length=16)
    record_a = hf_sparse.prune(a, hf_sparse.SparsityConfig(**common), show_progress=False)
    record_b = hf_sparse.prune(b, hf_sparse.SparsityConfig(**common, sparsity_profile="uniform"), show_progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert "sparsity_profile" not in record_b.to_dict() and record_a.to_dict() == record_b.to_dict()


def test_explicit_profile_by_block_index_and_regex():
    model = tiny_llama(num_hidden_layers=3)
    profile = {1: 0.25, r"mlp\.down_proj": 0.75, "2": 0.4}
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, sparsity_profile=profile)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    for name, value in record.modules.items():
        if "down_proj" in name:
            expected = 0.75  # the regular expression wins over the block index
        elif ".layers.1." in name:
            expected = 0.25
        elif ".layers.2." in name:
            expected = 0.4
        else:
            expected = 0.5  # not listed: the config's sparsity
        assert record.target_modules[name] == expected
        assert abs(value - expected) < 1e-3, name
    assert record.sparsity_profile["name"] == "explicit"
    assert record.sparsity_profile["explicit"] == {"1": 0.25, r"mlp\.down_proj": 0.75, "2": 0.4}
    # The record (with its new fields) survives a JSON round trip and is validated.
    assert SparsityRecord.from_dict(json.loads(json.dumps(record.to_dict()))).to_dict() == record.to_dict()


@pytest.mark.parametrize("profile, fragment", [
    ({7: 0.5}, r"names block\(s\) \[7\], but the model has 2"),
    ({"nothing_matches_this": 0.5}, "match no pruned module"),
    ({"mlp": 0.5, "up_proj": 0.6}, "matches sparsity_profile keys"),
])
def test_explicit_profile_errors_name_the_key(profile, fragment):
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity_profile=profile)
    with pytest.raises(ValueError, match=fragment):
        hf_sparse.prune(tiny_llama(), cfg, show_progress=False)


@pytest.mark.parametrize("profile, fragment", [
    ({7: 0.5}, r"names block\(s\) \[7\], but the model has 2"),
    ({"nothing_matches_this": 0.5}, "match no pruned module"),
    ({"mlp": 0.5, "up_proj": 0.6}, "matches sparsity_profile keys"),
])
def test_explicit_profile_errors_come_before_the_weights_load(profile, fragment, tmp_path, monkeypatch):
    # Prune on load plans on the empty skeleton: a bad key fails before any weight is read. Wanda with a missing
    # calibration file would fail later (when the data is read): the profile error comes first.
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "model")
    refuse_weight_loading(monkeypatch)
    for method in ("magnitude", "wanda"):
        cfg = hf_sparse.SparsityConfig(method=method, sparsity_profile=profile,
                                       calibration=CALIBRATION, num_samples=8, sequence_length=16)
        with pytest.raises(ValueError, match=fragment):
            AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=cfg)
        with pytest.raises(ValueError, match=fragment):
            hf_sparse.AutoSparseModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=cfg)


def test_explicit_profile_error_in_prune_comes_before_calibration_is_read():
    # The calibration file does not exist: reading it would raise a different error.
    cfg = hf_sparse.SparsityConfig(method="wanda", sparsity_profile={9: 0.5}, calibration="/no/such/file.txt")
    with pytest.raises(ValueError, match=r"names block\(s\) \[9\]"):
        hf_sparse.prune(tiny_llama(), cfg, show_progress=False)


def test_a_good_explicit_profile_passes_the_check_before_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "model")
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, sparsity_profile={1: 0.25, r"q_proj": 0.75})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=cfg)
    record = model.config.sparsity_config
    assert record["target_modules"]["model.layers.0.self_attn.q_proj"] == 0.75
    assert record["target_modules"]["model.layers.1.mlp.up_proj"] == 0.25


def test_profiles_with_structured_methods_need_per_block_targets():
    # FLAP, PIP and DISP-LLM take per-block targets (tests/test_structured_profiles.py); layer removal cannot.
    assert hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.2,
                                    sparsity_profile="owl").sparsity_profile == "owl"
    with pytest.raises(ValueError, match="method 'shortgpt' removes whole decoder blocks"):
        hf_sparse.SparsityConfig(method="shortgpt", pattern="structured", sparsity=0.2, sparsity_profile="owl")


def test_owl_with_magnitude_needs_calibration(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, sparsity_profile="owl")
    assert cfg.needs_calibration and cfg.calibration_reader == "magnitude with sparsity_profile='owl'"
    with pytest.raises(ValueError, match="sparsity_profile='owl'.* needs calibration data"):
        hf_sparse.prune(tiny_llama(), cfg, show_progress=False)
    # Prune on load says so before any weight is read.
    tiny_llama().save_pretrained(tmp_path / "model")
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match="sparsity_profile='owl'.* needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=cfg)


def test_dense_statistics_pass_changes_nothing_and_gives_one_summary_per_block():
    model = tiny_llama(num_hidden_layers=3)
    before = [p.clone() for p in model.parameters()]
    engine = LayerwiseEngine(build_method("wanda"), SparsityPattern.parse("unstructured"), 0.5)
    summaries = engine.summarize_dense_blocks(model, CALIBRATION, 4, frozenset({"sq_norm"}),
                                              lambda triples: [t.name.split(".")[-1] for t, _w, _s in triples])
    assert len(summaries) == 3 and summaries[0] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- CLI ------------------------------------------------------------------------------------------------------------

def test_cli_owl_and_explicit_profile_flags(tmp_path):
    from hf_sparse.cli.prune import add_arguments, sparsity_config
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m", "--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl",
                              "--profile-option", "m=5", "--profile-option", "lambda=0.08", "--output", "o"])
    cfg = sparsity_config(args)
    assert cfg.sparsity_profile == "owl" and cfg.profile_options == {"m": 5.0, "lambda": 0.08}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"0": 0.3, "mlp": 0.6}))
    args = parser.parse_args(["m", "--sparsity-profile", str(path), "--output", "o"])
    assert sparsity_config(args).sparsity_profile == {"0": 0.3, "mlp": 0.6}
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--sparsity-profile", str(tmp_path / "missing.json"), "--output", "o"])


def test_cli_prune_with_owl_end_to_end(tmp_path):
    from test_cli import CALIB_ARGS, run, save_tiny_with_demo_tokenizer, _saved_record

    model = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    output = tmp_path / "pruned"
    assert run(["prune", model, "--method", "wanda", "--sparsity", "0.6", "--sparsity-profile", "owl",
                "--profile-option", "lambda=0.05", *CALIB_ARGS, "--output", output, "--no-model-card"]) == 0
    record = _saved_record(output)
    assert record["sparsity_profile"]["options"] == {"m": 5.0, "lambda": 0.05}
    assert abs(record["overall_sparsity"] - 0.6) < 1e-3


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "fista"])
def test_cli_prune_with_an_explicit_profile_on_every_unstructured_method(method, tmp_path):
    from test_cli import CALIB_ARGS, run, save_tiny_with_demo_tokenizer, _saved_record

    model = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"0": 0.3, r"mlp\.down_proj": 0.7}))
    output = tmp_path / "pruned"
    assert run(["prune", model, "--method", method, "--sparsity", "0.5", "--sparsity-profile", profile,
                *CALIB_ARGS, "--output", output, "--no-model-card"]) == 0
    record = _saved_record(output)
    targets = record["target_modules"]
    assert targets["model.layers.0.self_attn.q_proj"] == 0.3 and targets["model.layers.1.mlp.down_proj"] == 0.7
    assert targets["model.layers.1.self_attn.q_proj"] == 0.5
    assert all(abs(record["modules"][name] - value) < 0.01 for name, value in targets.items())


def test_cli_explicit_profile_error_comes_before_the_weights_load(tmp_path, monkeypatch, capsys):
    from test_cli import run, save_tiny_with_demo_tokenizer

    model = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"0": 0.3, "12": 0.6}))
    refuse_weight_loading(monkeypatch)
    assert run(["prune", model, "--method", "magnitude", "--sparsity-profile", profile,
                "--output", tmp_path / "out", "--no-model-card"]) == 2
    assert "names block(s) [12], but the model has 2 decoder blocks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- the shared model -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_owl_on_the_shared_model_hits_the_target_and_records_blocks():
    if not MODEL_DIR.exists() or not CALIBRATION_TXT.exists() or not TEST_TXT.exists():
        pytest.skip(f"shared assets not found under {MODEL_DIR.parent.parent}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    cfg = hf_sparse.SparsityConfig(method="wanda", sparsity=0.7, sparsity_profile="owl", calibration=str(CALIBRATION_TXT),
                                   num_samples=8, sequence_length=128)
    record = hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
    assert abs(record.overall_sparsity - 0.7) < 1e-5
    blocks = record.sparsity_profile["block_sparsity"]
    # OWL spreads the blocks over a window of width 2λ (0.16), placed so the (here equal-sized) blocks average 0.7;
    # the window sits off-centre when the outlier ratios are skewed, so it need not be exactly [0.62, 0.78].
    values = list(blocks.values())
    assert len(values) == 6 and max(values) - min(values) == pytest.approx(0.16, abs=1e-5)
    assert sum(values) / len(values) == pytest.approx(0.7, abs=1e-5)
    ppl = hf_sparse.evaluate.perplexity(model, tokenizer, TEST_TXT.read_text(encoding="utf-8"), sequence_length=256,
                                        max_windows=20, show_progress=False)
    assert math.isfinite(ppl)
