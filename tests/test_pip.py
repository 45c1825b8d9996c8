"""PIP (perturbation-based iterative pruning): hand-checkable scores, the gradient difference and the masks against
autograd and surgery, budget and record on a tiny Llama, determinism, save/reload, option errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_sparse
from hf_sparse.architectures import get_architecture, get_architecture_for
from hf_sparse.methods.pip import (
    PIPOptions,
    attention_channel_scores,
    channel_scores,
    group_scores,
    masked_units,
    perturbed_view,
)
from hf_sparse.engine.structured import StructuredSession
from hf_sparse.surgery import AttentionEdit, BlockEdit, MLPEdit, StructuredEdits, apply_and_describe, block_parameters, \
    unit_parameters
from hf_sparse.surgery.apply import BlockShape
from test_architectures import build

LLAMA = get_architecture_for("llama")


def _calibration(n=4, seq=32, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _config(sparsity, seed=0, **options):
    return hf_sparse.SparsityConfig(method="pip", pattern="structured", sparsity=sparsity, calibration=_calibration(),
                                    num_samples=4, sequence_length=32, batch_size=2, seed=seed, method_options=options)


def _logits(model, ids=_calibration(1, 16, 5)):
    with torch.no_grad():
        return model(ids).logits


def test_group_scores_sum_taylor_terms_per_kv_group():
    # 2 query heads per key/value head, head_dim 1: group g = q rows 2g, 2g+1; k/v row g; o columns 2g, 2g+1.
    decl, shape = LLAMA.attention_heads, BlockShape(4, 2, 1, 3)
    weights = {decl.query: torch.tensor([[1.0], [2.0], [3.0], [4.0]]), decl.key: torch.tensor([[1.0], [-1.0]]),
               decl.value: torch.tensor([[2.0], [0.0]]), decl.output: torch.tensor([[1.0, 0.0, 0.0, 2.0]])}
    grads = {decl.query: torch.tensor([[1.0], [1.0], [-1.0], [0.0]]), decl.key: torch.tensor([[3.0], [3.0]]),
             decl.value: torch.tensor([[1.0], [5.0]]), decl.output: torch.tensor([[2.0, 7.0, 1.0, -1.0]])}
    # group 0: |1*1|+|2*1| + |1*3| + |2*1| + |1*2|+|0*7| = 10; group 1: |3*-1|+0 + |-1*3| + 0 + 0+|2*-1| = 8
    assert group_scores(decl, shape, weights, grads).tolist() == [10.0, 8.0]


def test_channel_scores_sum_rows_of_inputs_and_column_of_output():
    decl = LLAMA.mlp_channels
    weights = {decl.inputs[0]: torch.tensor([[1.0, -2.0], [0.5, 0.0]]), decl.inputs[1]: torch.tensor([[1.0, 1.0],
                                                                                                     [1.0, 1.0]]),
               decl.output: torch.tensor([[3.0, 1.0]])}
    grads = {decl.inputs[0]: torch.tensor([[1.0, 1.0], [2.0, 9.0]]), decl.inputs[1]: torch.tensor([[0.0, 1.0],
                                                                                                   [-1.0, 0.0]]),
             decl.output: torch.tensor([[1.0, -4.0]])}
    # channel 0: |1|+|-2| + |0|+|1| + |3| = 7; channel 1: |1|+0 + |-1|+0 + |-4| = 6
    assert channel_scores(decl, weights, grads).tolist() == [7.0, 6.0]
    fused = get_architecture_for("phi3").mlp_channels  # rows c and I + c of [gate; up]
    stacked = {fused.inputs[0]: torch.cat([weights[decl.inputs[0]], weights[decl.inputs[1]]]),
               fused.output: weights[decl.output]}
    stacked_grads = {fused.inputs[0]: torch.cat([grads[decl.inputs[0]], grads[decl.inputs[1]]]),
                     fused.output: grads[decl.output]}
    assert channel_scores(fused, stacked, stacked_grads).tolist() == [7.0, 6.0]


def test_masked_units_equal_removing_them():
    model = build("llama")
    removed = {(0, "kv_group"): {1}, (1, "mlp_channel"): {0, 5, 77}}
    session = StructuredSession(model, _calibration(), batch_size=2, show_progress=False)
    with masked_units(session, removed):
        masked = _logits(model)
    assert not torch.equal(masked, _logits(model))  # the hooks are gone afterwards
    pruned = copy.deepcopy(model)
    edits = StructuredEdits(blocks={0: BlockEdit(attention=AttentionEdit.whole_groups((0,), 2)),
                                    1: BlockEdit(mlp=MLPEdit(tuple(c for c in range(128) if c not in (0, 5, 77))))})
    apply_and_describe(get_architecture(pruned), pruned, edits)
    torch.testing.assert_close(masked, _logits(pruned), rtol=1e-5, atol=1e-6)


def test_perturbed_views_follow_the_strength():
    model = build("llama")
    ids = _calibration()
    replaced, _ = perturbed_view(model, ids, "token_replace", 0.5, torch.Generator().manual_seed(0))
    share = (replaced != ids).float().mean().item()
    assert 0.35 < share < 0.55  # ~0.5, minus the random ids that happen to equal the original
    _, embeds = perturbed_view(model, ids, "embedding_noise", 0.1, torch.Generator().manual_seed(0))
    clean = model.get_input_embeddings()(ids)
    relative = ((embeds - clean).pow(2).mean(-1).sqrt() / clean.pow(2).mean(-1).sqrt()).mean().item()
    assert relative == pytest.approx(0.1, rel=0.1)


def test_gradient_difference_matches_autograd_on_both_views():
    from hf_sparse.methods.pip import gradient_difference
    from tqdm.auto import tqdm

    model = build("llama")
    ids = _calibration(2, 16)
    session = StructuredSession(model, ids, batch_size=2, show_progress=False)
    options = PIPOptions(perturbation="token_replace", strength=0.3)
    names = [(1, "mlp.down_proj"), (0, "self_attn.q_proj")]
    got = gradient_difference(session, names, options, torch.Generator().manual_seed(3), tqdm(disable=True))
    perturbed, _ = perturbed_view(model, ids, "token_replace", 0.3, torch.Generator().manual_seed(3))
    weights = [model.model.layers[1].mlp.down_proj.weight, model.model.layers[0].self_attn.q_proj.weight]

    def grads(inputs):
        logits = model(inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        return torch.autograd.grad(loss, weights)

    expected = [a - b for a, b in zip(grads(ids), grads(perturbed))]
    for name, want in zip(names, expected):
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_attention_channel_scores_add_up_to_the_group_scores():
    decl, shape = LLAMA.attention_heads, BlockShape(6, 2, 4, 8)  # 3 query heads per group, head_dim 4
    generator = torch.Generator().manual_seed(0)
    sizes = {decl.query: (24, 16), decl.key: (8, 16), decl.value: (8, 16), decl.output: (16, 24)}
    weights = {n: torch.randn(s, generator=generator) for n, s in sizes.items()}
    grads = {n: torch.randn(s, generator=generator) for n, s in sizes.items()}
    per_channel = attention_channel_scores(decl, shape, weights, grads)
    assert per_channel.shape == (24,)
    torch.testing.assert_close(per_channel.reshape(2, 12).sum(1), group_scores(decl, shape, weights, grads))
    # Query row 5 (head 1, dim 1) and output column 5 belong to channel 5 alone.
    bumped = {**weights, decl.query: weights[decl.query].clone()}
    bumped[decl.query][5] += 1.0
    changed = (attention_channel_scores(decl, shape, bumped, grads) != per_channel).nonzero().flatten().tolist()
    assert changed == [5]


@pytest.mark.parametrize("sparsity,rounds,options", [(0.2, 1, {}), (0.5, 3, {}),
                                                     (0.3, 2, {"normalization": "layer"}),
                                                     (0.3, 1, {"normalization": "layer", "bias_compensation": True})])
def test_pip_meets_the_budget_and_keeps_every_block_alive(sparsity, rounds, options):
    model = build("llama")
    adapter = get_architecture(model)
    before = block_parameters(adapter, model)
    largest_unit = max(unit_parameters(adapter, b)["kv_group"] for b in adapter.blocks(model))
    record = hf_sparse.prune(model, _config(sparsity, rounds=rounds, **options), show_progress=False)
    after = block_parameters(adapter, model)
    assert record.overall_sparsity == 1 - after / before
    assert abs((before - after) - sparsity * before) <= largest_unit
    for entry in record.structure["blocks"]:
        assert entry["kv_heads"] >= 1 and entry["mlp_channels"] >= 1
        assert entry["attention_heads"] == 2 * entry["kv_heads"]  # whole GQA groups
    assert record.method_options["rounds"] == rounds
    assert torch.isfinite(_logits(model)).all()
    has_bias = any(getattr(m, "bias", None) is not None for b in adapter.blocks(model)
                   for m in b.modules() if isinstance(m, torch.nn.Linear))
    assert has_bias == options.get("bias_compensation", False)


def test_pip_bias_compensation_adds_the_removed_channels_mean_contribution():
    plain, compensated = build("llama"), build("llama")
    record = hf_sparse.prune(plain, _config(0.3, rounds=1), show_progress=False)
    other = hf_sparse.prune(compensated, _config(0.3, rounds=1, bias_compensation=True), show_progress=False)
    # Same units removed (the choice does not depend on compensation); only the new biases differ.
    widths = [[(b["kv_heads"], b["mlp_channels"]) for b in r.structure["blocks"]] for r in (record, other)]
    assert widths[0] == widths[1]
    plain_state, comp_state = plain.state_dict(), compensated.state_dict()
    assert set(comp_state) - set(plain_state)  # the biases
    for name, tensor in plain_state.items():
        assert torch.equal(tensor, comp_state[name])


def test_pip_is_deterministic_for_a_seed_and_reloads_bit_identically(tmp_path):
    first, second, other = build("llama"), build("llama"), build("llama")
    record = hf_sparse.prune(first, _config(0.3), show_progress=False)
    assert hf_sparse.prune(second, _config(0.3), show_progress=False).structure == record.structure
    hf_sparse.prune(other, _config(0.3, seed=1, strength=0.5), show_progress=False)
    assert torch.equal(_logits(first), _logits(second))
    first.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(first))


@pytest.mark.parametrize("options,message", [
    ({"perturbation": "dropout"}, "perturbation must be one of"),
    ({"strength": 0.0}, "strength"),
    ({"perturbation": "token_replace", "strength": 1.5}, "at most 1"),
    ({"rounds": 0}, "rounds"),
    ({"normalization": "zscore"}, "normalization must be one of"),
    ({"bias_compensation": "yes"}, "bias_compensation"),
])
def test_pip_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        _config(0.3, **options)


def test_cli_prunes_with_pip_and_the_checkpoint_reloads(tmp_path):
    from conftest import DEMO_CALIBRATION, save_tiny_with_demo_tokenizer
    from hf_sparse import cli

    tiny = save_tiny_with_demo_tokenizer(tmp_path / "tiny-llama")
    output = tmp_path / "pip"
    assert cli.main([str(a) for a in [
        "prune", tiny, "--method", "pip", "--pattern", "structured", "--sparsity", 0.3,
        "--method-option", "rounds=2", "--method-option", "perturbation=token_replace",
        "--calibration", DEMO_CALIBRATION, "--num-samples", 4, "--sequence-length", 32, "--batch-size", 2,
        "--no-model-card", "--output", output]]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output)
    record = hf_sparse.read_record(reloaded)
    assert record.method == "pip" and record.method_options["rounds"] == 2
    assert abs(record.overall_sparsity - 0.3) < 0.1
    assert torch.isfinite(_logits(reloaded)).all()
