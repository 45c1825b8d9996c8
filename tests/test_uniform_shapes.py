"""Uniform shapes for FLAP and PIP: every block keeps the same key/value groups and MLP channels (each its own
lowest-scoring ones), the counts from the global ranking, rounding to a channel multiple, the record, a stock config
that plain transformers loads without hf_sparse, and the refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse.methods.units import BlockUnits, Unit, round_channel_counts, uniform_unit_counts

CALIBRATION = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
# conftest's tiny Llama: one block holds 36,992 parameters, a key/value group 6,144, an MLP channel 192.
BLOCK, GROUP, CHANNEL = 36_992, 6_144, 192


def _config(method, sparsity=0.3, **options):
    return hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity, calibration=CALIBRATION,
                                    num_samples=8, sequence_length=32, batch_size=4, method_options=options)


def _shapes(record):
    return [(b["attention_heads"], b["kv_heads"], b["mlp_channels"]) for b in record.structure["blocks"]]


def _blocks(n=3):
    return [BlockUnits(i, 1000, counts={"kv_group": 4, "mlp_channel": 100}, costs={"kv_group": 100, "mlp_channel": 6})
            for i in range(n)]


# -- the counts, by hand ---------------------------------------------------------------------------------------------

def test_uniform_counts_take_the_group_split_from_the_ranking_and_fill_with_channels():
    ranked = [Unit(0.0, 100, b, "kv_group", 0) for b in (0, 1)] + [Unit(0.0, 100, 2, "kv_group", g) for g in (0, 1)]
    # 4 groups over 3 blocks: 1.33 -> 1 group per block (100), then (300 - 100) / 6 = 33.3 -> 33 channels
    assert uniform_unit_counts(_blocks(), 0.3, ranked) == {
        (b, kind): n for b in range(3) for kind, n in (("kv_group", 1), ("mlp_channel", 33))}
    # no group ranked for removal: the MLP alone loses 300 / 6 = 50 channels in every block
    counts = uniform_unit_counts(_blocks(), 0.3, [Unit(0.0, 6, 0, "mlp_channel", 0)])
    assert {counts[(b, "kv_group")] for b in range(3)} == {0} and {counts[(b, "mlp_channel")] for b in range(3)} == {50}
    # without a ranking: share of the groups (1.2 -> 1), as FLAP's uniform-per-layer rule
    assert uniform_unit_counts(_blocks(1), 0.3) == {(0, "kv_group"): 1, (0, "mlp_channel"): 33}


def test_uniform_counts_refuse_blocks_of_different_shapes():
    blocks = _blocks(2)
    blocks[1] = BlockUnits(1, 900, counts={"kv_group": 3, "mlp_channel": 100}, costs={"kv_group": 100,
                                                                                     "mlp_channel": 6})
    with pytest.raises(ValueError, match=r"uniform_shapes needs blocks of one shape, but block 1 has"):
        uniform_unit_counts(blocks, 0.3)


def test_round_channel_counts_keep_a_multiple():
    totals = {(0, "mlp_channel"): 128, (1, "mlp_channel"): 128}
    rounded = round_channel_counts({(0, "mlp_channel"): 37, (1, "mlp_channel"): 37, (0, "kv_group"): 1}, totals, 16)
    assert rounded == {(0, "mlp_channel"): 32, (1, "mlp_channel"): 32, (0, "kv_group"): 1}  # keeps 91 -> 96
    assert round_channel_counts({(0, "mlp_channel"): 127}, totals, 16) == {(0, "mlp_channel"): 112}  # at least 16


# -- the methods -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("flap", {}), ("flap", {"bias_compensation": False}), ("pip", {}), ("pip", {"rounds": 2}),
])
def test_every_block_keeps_the_same_shape_and_the_budget_is_met(method, options):
    model = tiny_llama(num_hidden_layers=3)
    record = hf_sparse.prune(model, _config(method, 0.3, uniform_shapes=True, **options), show_progress=False)
    shapes = _shapes(record)
    assert len(set(shapes)) == 1 and shapes[0] != (4, 2, 128)
    assert record.method_options["uniform_shapes"] is True
    # half a channel (+ a compensation bias) per block, and the zero biases that make FLAP's biases config keys
    zero = sum(m.bias.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and m.bias is not None and not name.endswith(("o_proj", "down_proj")))
    assert abs(record.overall_sparsity - 0.3) * 3 * BLOCK <= CHANNEL / 2 + 64 + zero
    assert torch.isfinite(model(IDS).logits).all()


def test_blocks_remove_their_own_lowest_scoring_units():
    """Same counts, but which channels go is each block's own choice: the blocks do not keep the same indices."""
    from hf_sparse.engine.structured import StructuredSession
    from hf_sparse.methods import build_method

    model = tiny_llama(num_hidden_layers=3)
    method = build_method("flap", {"uniform_shapes": True, "bias_compensation": False})
    edits = method.plan_edits(StructuredSession(model, CALIBRATION, 4, show_progress=False), 0.3)
    kept = [edits.blocks[i].mlp.kept_channels for i in range(3)]
    assert len({len(k) for k in kept}) == 1 and len(set(kept)) > 1


def test_channel_multiple_rounds_the_one_width():
    for method in ("flap", "pip"):
        record = hf_sparse.prune(tiny_llama(num_hidden_layers=3),
                                 _config(method, 0.3, uniform_shapes=True, channel_multiple=16), show_progress=False)
        (shape,) = set(_shapes(record))
        assert shape[2] % 16 == 0


@pytest.mark.parametrize("method", ["pip", "flap"])
def test_uniform_model_is_a_stock_config_for_plain_transformers(tmp_path, method):
    """PIP (no biases) and FLAP with its compensation biases: Llama's attention_bias / mlp_bias keys describe the
    biases once the sub-block's other linears hold zero biases."""
    model = tiny_llama(num_hidden_layers=3)
    record = hf_sparse.prune(model, _config(method, 0.3, uniform_shapes=True), show_progress=False)
    assert record.structure["loading"] == "config"
    if method == "flap":
        assert model.config.mlp_bias and all(b.mlp.gate_proj.bias is not None for b in model.model.layers)
        assert record.structure["block_parameters"] == sum(p.numel() for p in model.model.layers.parameters())
    heads, kv_heads, channels = _shapes(record)[0]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == \
        (heads, kv_heads, channels)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_sparse"] = None  # any import of hf_sparse fails
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "plain.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.allclose(torch.load(tmp_path / "plain.pt"), expected, atol=1e-5)


# -- refusals --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flap", "pip"])
def test_uniform_shapes_must_be_a_boolean(method):
    with pytest.raises(ValueError, match=rf"{method} (option )?uniform_shapes must be True or False, got .yes."):
        _config(method, uniform_shapes="yes")


@pytest.mark.parametrize("method", ["flap", "pip"])
def test_uniform_shapes_refuse_per_block_targets_before_measuring(method):
    cfg = hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=0.3, calibration=CALIBRATION,
                                   num_samples=8, sequence_length=32, batch_size=4,
                                   sparsity_profile={"0": 0.1, "1": 0.4},
                                   method_options={"uniform_shapes": True})
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="uniform_shapes=True gives every block the same shape, so it cannot follow"):
        hf_sparse.prune(model, cfg, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pip_channel_multiple_needs_counts_decided_up_front():
    with pytest.raises(ValueError, match=r"pip option channel_multiple=16 rounds counts decided up front"):
        hf_sparse.prune(tiny_llama(), _config("pip", 0.3, channel_multiple=16), show_progress=False)
    with pytest.raises(ValueError, match=r"pip (option )?channel_multiple must be .*0"):
        _config("pip", channel_multiple=0)


def test_uniform_head_counts_are_ones_the_config_class_accepts(tmp_path):
    """8 heads of width 8 in 4 groups at hidden 64: 6 heads (one group gone) do not divide 64, so Llama's config
    refuses them; the uniform rule removes 0, 2 or 3 groups only, and the model stays a stock config."""
    from hf_sparse.engine.structured import StructuredSession
    from hf_sparse.methods.units import stock_group_removals

    model = tiny_llama(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
    assert stock_group_removals(StructuredSession(model, CALIBRATION, 4, show_progress=False)) == {0, 2, 3}
    for sparsity in (0.2, 0.3, 0.4):
        model = tiny_llama(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
        record = hf_sparse.prune(model, _config("pip", sparsity, uniform_shapes=True), show_progress=False)
        assert record.structure["loading"] == "config"
        assert 64 % _shapes(record)[0][0] == 0
