"""Per-block targets for structured methods: the unit-count rule on hand-checkable numbers, each block's share and
the overall share within their bounds (FLAP, PIP, DISP-LLM), OWL from the same planner as unstructured methods, prune
on load and reload, the record and the model card, the CLI, and the refusals (layer removal, regex keys, N:M, blocks
past the model, shares out of reach)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hf_sparse
from conftest import refuse_weight_loading, tiny_llama
from hf_sparse.architectures import get_architecture
from hf_sparse.methods.units import BlockUnits, block_unit_counts
from hf_sparse.record import SparsityRecord
from hf_sparse.surgery import parameters_per_block, unit_parameters

CALIBRATION = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
EXPLICIT = {"0": 0.1, "1": 0.4, "2": 0.25}
OWL = dict(sparsity_profile="owl", profile_options={"m": 2, "lambda": 0.1})

# The tiny Llama of conftest: hidden 64, 4 heads of 16 in 2 key/value groups, 128 MLP channels. One block holds
# 4·64·64 (q, o) + 2·32·64 (k, v) + 3·64·128 (MLP) + 2·64 (norms) = 36,992 parameters; a key/value group costs
# 2·16·64 (its q rows) + 2·16·64 (k, v rows) + 64·32 (o columns) = 6,144, an MLP channel 3·64 = 192.
BLOCK, GROUP, CHANNEL = 36_992, 6_144, 192


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _config(method, sparsity=0.3, **kwargs):
    return hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity, calibration=CALIBRATION,
                                    num_samples=8, sequence_length=32, batch_size=4, **kwargs)


def _shares(record) -> tuple[dict[int, float], dict[int, float]]:
    profile = record.sparsity_profile
    return ({int(i): v for i, v in profile["block_sparsity"].items()},
            {int(i): v for i, v in profile["block_achieved"].items()})


# -- the unit-count rule, by hand ------------------------------------------------------------------------------------

def test_block_unit_counts_round_groups_then_fill_with_channels():
    block = BlockUnits(0, 1000, counts={"kv_group": 4, "mlp_channel": 100}, costs={"kv_group": 100, "mlp_channel": 6})
    # 0.3: 1.2 groups -> 1 (100), the rest 200 / 6 = 33.3 -> 33 channels (198): 298 of 300
    assert block_unit_counts(block, 0.3) == {"kv_group": 1, "mlp_channel": 33}
    # 0.45: 1.8 groups -> 2 (200), 250 / 6 = 41.7 -> 42 channels (252): 452 of 450
    assert block_unit_counts(block, 0.45) == {"kv_group": 2, "mlp_channel": 42}
    assert block_unit_counts(block, 0.0) == {"kv_group": 0, "mlp_channel": 0}


def test_block_unit_counts_pay_for_a_compensation_bias():
    # Removing any group adds a 10-parameter bias, any channel an 8-parameter one: 1 group removes 90, then
    # (210 + 8) / 6 = 36.3 -> 36 channels remove 36·6 - 8 = 208: 298 of 300.
    block = BlockUnits(0, 1000, counts={"kv_group": 4, "mlp_channel": 100}, costs={"kv_group": 100, "mlp_channel": 6},
                       added={"kv_group": 10, "mlp_channel": 8})
    assert block_unit_counts(block, 0.3) == {"kv_group": 1, "mlp_channel": 36}


def test_block_unit_counts_fall_back_when_the_nearest_group_count_overshoots():
    # Two groups of 300: 0.26 is 0.52 groups -> 1 group would already remove 300 > 260, which no channel count can
    # undo, so no group goes and 260 / 4 = 65 channels do (exact).
    block = BlockUnits(3, 1000, counts={"kv_group": 2, "mlp_channel": 100}, costs={"kv_group": 300, "mlp_channel": 4})
    assert block_unit_counts(block, 0.26) == {"kv_group": 0, "mlp_channel": 65}
    # At most 1 group (300) and 99 channels (396): 0.72 (720) is out of reach, and said so, not clamped.
    with pytest.raises(ValueError, match=r"block 3: a target of 0.7200 of its 1,000 parameters is out of reach; "
                                         r"keeping one unit of each kind \(kv_group, mlp_channel\) it can lose at "
                                         r"most 0.6960"):
        block_unit_counts(block, 0.72)


def test_tiny_model_unit_costs_are_the_ones_the_bounds_use():
    model = tiny_llama(num_hidden_layers=3)
    adapter = get_architecture(model)
    assert parameters_per_block(adapter, model) == [BLOCK] * 3
    costs = unit_parameters(adapter, adapter.blocks(model)[0])
    assert (costs["kv_group"], costs["mlp_channel"]) == (GROUP, CHANNEL)


# -- each block's share, and the overall share ------------------------------------------------------------------------

@pytest.mark.parametrize("method, options", [
    ("flap", {}),  # bias compensation on: its new biases are paid for in the counts
    ("flap", {"bias_compensation": False}),
    ("pip", {}),
    ("pip", {"rounds": 2, "bias_compensation": True}),
])
def test_each_block_loses_its_own_share_within_half_a_channel(method, options):
    model = tiny_llama(num_hidden_layers=3)
    record = hf_sparse.prune(model, _config(method, sparsity=0.5, sparsity_profile=EXPLICIT, method_options=options),
                             show_progress=False)
    targets, achieved = _shares(record)
    assert targets == {0: 0.1, 1: 0.4, 2: 0.25}
    # Recorded shares are the model's: dense 36,992 per block against what each block holds now.
    now = parameters_per_block(get_architecture(model), model)
    for index in range(3):
        assert achieved[index] == pytest.approx(1 - now[index] / BLOCK, abs=1e-6)
        assert abs(achieved[index] - targets[index]) * BLOCK <= CHANNEL / 2
    # FLAP's per-layer rule: each block loses the group count nearest to its share of 2 groups (0.2, 0.8, 0.5).
    assert [b["kv_heads"] for b in record.structure["blocks"]] == [2, 1, 1]
    # Overall: the parameter-weighted mean of the targets (0.25 here, not the config's 0.5: every block is listed),
    # within half a channel per block.
    assert abs(record.overall_sparsity - 0.25) * 3 * BLOCK <= 3 * CHANNEL / 2
    assert record.target_sparsity == 0.5


def test_blocks_not_listed_take_the_configs_sparsity():
    record = hf_sparse.prune(tiny_llama(num_hidden_layers=3), _config("flap", sparsity=0.2, sparsity_profile={1: 0.4}),
                             show_progress=False)
    targets, achieved = _shares(record)
    assert targets == {0: 0.2, 1: 0.4, 2: 0.2}
    assert all(abs(achieved[i] - targets[i]) * BLOCK <= CHANNEL / 2 for i in range(3))
    assert record.sparsity_profile["explicit"] == {"1": 0.4}


def test_disp_llm_takes_per_block_budgets():
    from hf_sparse.engine.structured import StructuredSession
    from hf_sparse.methods.disp_llm import block_costs

    model = tiny_llama(num_hidden_layers=3)
    costs = [block_costs(StructuredSession(model, IDS, show_progress=False), i) for i in range(3)]
    # The final threshold moves one entry of one selection at a time: at most the costliest entry per block.
    largest_dimension = max(c.attention_rows + c.attention_width + 2 * c.channels + c.channels for c in costs)
    record = hf_sparse.prune(model, _config("disp_llm", sparsity_profile=EXPLICIT,
                                            method_options={"steps": 4, "windows_per_step": 2}), show_progress=False)
    targets, achieved = _shares(record)
    for index in range(3):
        assert abs(achieved[index] - targets[index]) * BLOCK <= largest_dimension
    assert abs(record.overall_sparsity - 0.25) * 3 * BLOCK <= 3 * largest_dimension
    # The importance start cuts MLP channels before the residual stream: every block is narrower in one or the other.
    dense_channels = record.structure["original"]["mlp_channels"]
    assert all("residual_dims" in b or b["mlp_channels"] < dense_channels for b in record.structure["blocks"])


def test_uniform_profile_keeps_the_global_search():
    a, b = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    record_a = hf_sparse.prune(a, _config("flap"), show_progress=False)
    record_b = hf_sparse.prune(b, _config("flap", sparsity_profile="uniform"), show_progress=False)
    assert record_a.to_dict() == record_b.to_dict() and "sparsity_profile" not in record_b.to_dict()
    assert torch.equal(_logits(a), _logits(b))


# -- OWL: the same planner, prune on load, reload ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flap", "pip"])
def test_owl_with_structured_methods_end_to_end(method, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=_config(method, **OWL))
    record = hf_sparse.read_record(model)
    targets, achieved = _shares(record)
    profile = record.sparsity_profile
    assert profile["name"] == "owl" and profile["options"] == {"m": 2.0, "lambda": 0.1}
    # One code path: the block targets are exactly the ones OWL gives an unstructured method on the same data
    # (equal blocks, so weighing by all their parameters or by their linears gives the same shift).
    wanda = hf_sparse.prune(AutoModelForCausalLM.from_pretrained(tmp_path / "model"),
                            hf_sparse.SparsityConfig(method="wanda", sparsity=0.3, calibration=CALIBRATION,
                                                     num_samples=8, sequence_length=32, batch_size=4, **OWL),
                            show_progress=False).sparsity_profile
    assert profile["block_sparsity"] == wanda["block_sparsity"]
    assert profile["block_outlier_ratio"] == wanda["block_outlier_ratio"]
    assert len(set(targets.values())) == 3 and max(targets.values()) - min(targets.values()) == pytest.approx(0.2)
    assert sum(targets.values()) / 3 == pytest.approx(0.3, abs=1e-9)  # equal blocks: the mean is the target
    for index in range(3):
        assert abs(achieved[index] - targets[index]) * BLOCK <= CHANNEL / 2
    assert abs(record.overall_sparsity - 0.3) * 3 * BLOCK <= 3 * CHANNEL / 2
    # More outliers, fewer parameters removed.
    ratios = {int(i): d for i, d in profile["block_outlier_ratio"].items()}
    assert sorted(range(3), key=ratios.get) == sorted(range(3), key=targets.get, reverse=True)
    # The same model as pruning the loaded dense model; it saves and reloads bit-identically.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    expected = hf_sparse.prune(reference, _config(method, **OWL), show_progress=False)
    assert expected.to_dict()["sparsity_profile"] == record.to_dict()["sparsity_profile"]
    assert torch.equal(_logits(reference), _logits(model))
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert torch.equal(_logits(reloaded), _logits(model))
    assert hf_sparse.read_record(reloaded).sparsity_profile == record.sparsity_profile


def test_owl_weighs_blocks_by_all_their_parameters():
    # The planner's shift with block sizes: Σ size·s = S·Σ size for the sizes given (a 4:1 block-size ratio).
    from hf_sparse.config.profiles import allocate
    from hf_sparse.engine import LayerwiseEngine
    from hf_sparse.masks import SparsityPattern
    from hf_sparse.methods import build_method

    model = tiny_llama(num_hidden_layers=3)
    engine = LayerwiseEngine(build_method("flap"), SparsityPattern.parse("structured"), 0.3, show_progress=False)
    sizes = {0: 4000, 1: 1000, 2: 1000}
    allocation = allocate("owl", {"m": 2, "lambda": 0.1}, 0.3, engine, model, CALIBRATION, 4, block_sizes=sizes)
    blocks = allocation.block_sparsity
    assert sum(blocks[i] * n for i, n in sizes.items()) == pytest.approx(0.3 * 6000, abs=1e-6)
    assert max(blocks.values()) - min(blocks.values()) == pytest.approx(0.2)


# -- the record and the model card ------------------------------------------------------------------------------------

def test_record_holds_targets_and_achieved_shares_and_the_card_shows_them():
    from hf_sparse.integrations.hub import render_model_card

    model = tiny_llama(num_hidden_layers=3)
    record = hf_sparse.prune(model, _config("flap", sparsity_profile=EXPLICIT), show_progress=False)
    data = json.loads(json.dumps(model.config.sparsity_config))
    profile = data["sparsity_profile"]
    assert list(profile) == ["name", "options", "block_sparsity", "block_achieved", "explicit"]
    assert profile["block_sparsity"] == {"0": 0.1, "1": 0.4, "2": 0.25}
    assert profile["explicit"] == EXPLICIT
    assert SparsityRecord.from_dict(data).to_dict() == record.to_dict()  # validated on the way back
    bad = json.loads(json.dumps(data))
    bad["sparsity_profile"]["block_achieved"]["1"] = 1.5
    with pytest.raises(ValueError, match=r"sparsity_profile.block_achieved\['1'\] must be in \[0, 1\]"):
        SparsityRecord.from_dict(bad)
    low, high = min(profile["block_achieved"].values()), max(profile["block_achieved"].values())
    card = str(render_model_card(model, license="apache-2.0"))
    assert (f"| Sparsity profile | explicit: blocks from 10.0% to 40.0% of their parameters (removed: "
            f"{low * 100:.1f}% to {high * 100:.1f}%) |") in card


# -- refusals ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["shortgpt", "sleb"])
@pytest.mark.parametrize("profile, shown", [("owl", "'owl'"), ({"0": 0.2}, r"\{'0': 0.2\}")])
def test_layer_removal_refuses_per_block_targets(method, profile, shown):
    with pytest.raises(ValueError, match=rf"sparsity_profile={shown} gives every decoder block its own share to "
                                         rf"remove, but method '{method}' removes whole decoder blocks.*"
                                         r"\['disp_llm', 'flap', 'pip'\]"):
        _config(method, sparsity_profile=profile)


def test_module_regex_keys_and_n_m_are_refused():
    with pytest.raises(ValueError, match=r"sparsity_profile key 'mlp\\\\.down_proj' is a module-name regular "
                                         r"expression; with pattern='structured'.*must be block indices"):
        _config("flap", sparsity_profile={"0": 0.2, r"mlp\.down_proj": 0.5})
    with pytest.raises(ValueError, match="per-block N:M .* is not supported"):
        hf_sparse.SparsityConfig(method="wanda", pattern="2:4", sparsity_profile={"0": 0.2})


def test_engine_refuses_block_targets_for_a_method_without_them():
    from hf_sparse.engine.structured import run_structured
    from hf_sparse.methods import build_method

    with pytest.raises(ValueError, match="method 'shortgpt' removes whole decoder blocks"):
        run_structured(tiny_llama(), build_method("shortgpt"), CALIBRATION, None, block_targets={0: 0.2, 1: 0.2})
    with pytest.raises(ValueError, match=r"must name every decoder block 0..1 once; missing \[1\], unknown \[\]"):
        run_structured(tiny_llama(), build_method("flap"), CALIBRATION, None, block_targets={0: 0.2})


def test_a_block_past_the_model_fails_before_the_weights_load(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "model")
    refuse_weight_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"names block\(s\) \[5\], but the model has 2 decoder blocks"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", sparsity_config=_config("flap",
                                                                                          sparsity_profile={5: 0.3}))


def test_a_share_out_of_a_blocks_reach_names_the_block():
    with pytest.raises(ValueError, match=r"block 1: a target of 0.9900 of its 36,992 parameters is out of reach"):
        hf_sparse.prune(tiny_llama(), _config("flap", sparsity_profile={1: 0.99}), show_progress=False)


# -- CLI ----------------------------------------------------------------------------------------------------------------

def test_cli_prunes_structured_with_a_profile(tmp_path):
    from conftest import save_tiny_with_demo_tokenizer
    from test_cli import CALIB_ARGS, _saved_record, run

    model = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"0": 0.15, "1": 0.35}))
    assert run(["prune", model, "--method", "flap", "--pattern", "structured", "--sparsity", "0.3",
                "--sparsity-profile", profile, *CALIB_ARGS, "--output", tmp_path / "explicit"]) == 0
    record = _saved_record(tmp_path / "explicit")
    assert record["sparsity_profile"]["block_sparsity"] == {"0": 0.15, "1": 0.35}
    assert all(abs(record["sparsity_profile"]["block_achieved"][i] - t) * BLOCK <= CHANNEL / 2
               for i, t in (("0", 0.15), ("1", 0.35)))
    assert "| Sparsity profile | explicit: blocks from 15.0% to 35.0% of their parameters" in \
        (tmp_path / "explicit" / "README.md").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "explicit")
    assert [b["kv_heads"] for b in hf_sparse.read_record(reloaded).structure["blocks"]] == [2, 1]

    assert run(["prune", model, "--method", "pip", "--pattern", "structured", "--sparsity", "0.3",
                "--sparsity-profile", "owl", "--profile-option", "m=2", "--profile-option", "lambda=0.05",
                *CALIB_ARGS, "--output", tmp_path / "owl", "--no-model-card"]) == 0
    record = _saved_record(tmp_path / "owl")
    assert record["sparsity_profile"]["name"] == "owl"
    assert abs(record["overall_sparsity"] - 0.3) * 2 * BLOCK <= 2 * CHANNEL / 2


def test_cli_refuses_a_profile_with_layer_removal(tmp_path, capsys):
    from test_cli import run

    assert run(["prune", tmp_path / "never-read", "--method", "sleb", "--pattern", "structured", "--sparsity", "0.3",
                "--sparsity-profile", "owl", "--output", tmp_path / "out"]) == 2
    assert "method 'sleb' removes whole decoder blocks" in capsys.readouterr().err


# -- the shared model ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_owl_flap_on_the_shared_model_meets_every_blocks_target(model_dir):
    from conftest import CALIBRATION_TXT, TEST_TXT

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    adapter = get_architecture(model)
    dense = parameters_per_block(adapter, model)
    channel = unit_parameters(adapter, adapter.blocks(model)[0])["mlp_channel"]  # 3 · 256 = 768
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, sparsity_profile="owl",
                                   calibration=str(CALIBRATION_TXT), num_samples=8, sequence_length=128)
    record = hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
    targets, achieved = _shares(record)
    assert len(targets) == 6 and max(targets.values()) - min(targets.values()) == pytest.approx(0.16, abs=1e-5)
    for index in range(6):
        assert abs(achieved[index] - targets[index]) * dense[index] <= channel / 2
    assert abs(record.overall_sparsity - 0.3) * sum(dense) <= 6 * channel / 2
    ids = tokenizer(TEST_TXT.read_text()[:20000], return_tensors="pt").input_ids[:, : 4 * 256].reshape(4, 256)
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        pruned_loss, dense_loss = model(ids, labels=ids).loss.item(), dense_model(ids, labels=ids).loss.item()
    assert dense_loss < pruned_loss < dense_loss + 1.5  # worse than dense, far from broken
