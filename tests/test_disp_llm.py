"""DISP-LLM: per-block residual dimensions (surgery equals masking on every family that supports it, the clear error
elsewhere), save/reload, generation and LoRA on such a model, the parameter-count and penalty math, the hard masks,
determinism, the CLI, and a short run on the real 7M model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hf_sparse
from hf_sparse.architectures import get_architecture
from hf_sparse.methods.disp_llm import (
    SELECTIONS,
    BlockCosts,
    SelectionNetwork,
    block_costs,
    compensation_biases,
    compensation_fills,
    dense_moments,
    fit_loss,
    importance_prior,
    importance_scores,
    kept_parameters,
    parameter_penalty,
    straight_through_mask,
    threshold_masks,
)
from hf_sparse.engine.structured import StructuredSession
from hf_sparse.surgery import (
    RESIDUAL_POINTS,
    BlockEdit,
    MLPEdit,
    ResidualEdit,
    StructuredEdits,
    apply_and_describe,
    apply_edits,
    block_parameters,
    masked_residual,
)
from test_architectures import TINY_CONFIGS, build
from test_structured import _plain_transformers_logits, _record

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _supports_residual(model) -> bool:
    try:
        get_architecture(model).structure("residual_dims", model.config.model_type)
        return True
    except ValueError:
        return False


def _random_edits(hidden: int, channels: int, blocks: int, seed: int = 0) -> StructuredEdits:
    """Different random selections at every point of every block (one point left full width in block 1)."""
    generator = torch.Generator().manual_seed(seed)

    def pick(n, k):
        return tuple(sorted(torch.randperm(n, generator=generator)[:k].tolist()))

    edits = StructuredEdits()
    for index in range(blocks):
        kept = {point: pick(hidden, hidden // 2 + 5 * i + index) for i, point in enumerate(RESIDUAL_POINTS)}
        if index == 1:
            kept["attention_input"] = None
        edits.blocks[index] = BlockEdit(residual=ResidualEdit(**kept), mlp=MLPEdit(pick(channels, channels // 2 + 3)))
    return edits


def _masks_for(edits: StructuredEdits, hidden: int, channels: int) -> dict[int, dict[str, torch.Tensor]]:
    masks = {}
    for index, edit in edits.blocks.items():
        entry = {}
        for point in RESIDUAL_POINTS:
            mask = torch.zeros(hidden)
            mask[list(edit.residual.kept(point, hidden))] = 1
            entry[point] = mask
        mask = torch.zeros(channels)
        mask[list(edit.mlp.kept_channels)] = 1
        entry["mlp_channels"] = mask
        masks[index] = entry
    return masks


def _disp_edits(model) -> StructuredEdits:
    return _random_edits(model.config.hidden_size, 128, model.config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------------------
# Surgery


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_residual_surgery_equals_masking_or_names_the_architecture(model_type):
    model = build(model_type)
    adapter = get_architecture(model)
    edits = _disp_edits(model)
    if not _supports_residual(model):
        with pytest.raises(ValueError, match=rf"architecture '{model_type}' does not support structured pruning of "
                                             r"residual_dims: \w"):
            apply_edits(model, adapter, edits)
        return
    dense = _logits(model)
    with masked_residual(model, adapter, _masks_for(edits, model.config.hidden_size, 128)):
        masked = _logits(model)
    assert not torch.allclose(masked, dense)
    structure = apply_and_describe(adapter, model, edits)
    torch.testing.assert_close(_logits(model), masked, rtol=1e-5, atol=1e-5)
    block = adapter.blocks(model)[0]
    hidden = model.config.hidden_size
    assert block.self_attn.q_proj.in_features == len(edits.blocks[0].residual.attention_input)
    assert block.self_attn.o_proj.out_features == len(edits.blocks[0].residual.attention_output)
    assert block.mlp.down_proj.weight.shape == (len(edits.blocks[0].residual.mlp_output),
                                                len(edits.blocks[0].mlp.kept_channels))
    assert structure["loading"] == "hf_sparse" and structure["original"]["hidden_size"] == hidden
    assert structure["blocks"][1]["residual_dims"]["attention_input"] == hidden  # the unselected point: full width


def test_residual_edit_checks_its_indices():
    with pytest.raises(ValueError, match="attention_output must be strictly increasing"):
        ResidualEdit(attention_output=(3, 1))
    with pytest.raises(ValueError, match="mlp_input must keep at least one index"):
        ResidualEdit(mlp_input=())
    model = build("llama")
    with pytest.raises(ValueError, match=r"mlp_output has indices outside \[0, 64\)"):
        apply_edits(model, get_architecture(model), StructuredEdits(blocks={0: BlockEdit(
            residual=ResidualEdit(mlp_output=(0, 64)))}))


def test_residual_checkpoint_reloads_bit_identically_and_generates(tmp_path):
    model = build("qwen2")  # q/k/v biases: the read selection must leave them whole
    structure = apply_and_describe(get_architecture(model), model, _disp_edits(model))
    _record(model, structure)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == {"quant_method": "hf_sparse_structured"}
    assert saved["sparsity_config"]["format_version"] == 2
    assert saved["sparsity_config"]["structure"]["blocks"][0]["residual_dims"] == \
        {p: len(getattr(_disp_edits(model).blocks[0].residual, p)) for p in RESIDUAL_POINTS}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), expected)
    for position in range(2):  # the indices come from the checkpoint, not the placeholders of the skeleton
        for point in RESIDUAL_POINTS:
            original = getattr(model.model.layers[position].residual_dims, point, None)
            loaded = getattr(reloaded.model.layers[position].residual_dims, point, None)
            assert (original is None and loaded is None) or torch.equal(original, loaded)
    prompt = IDS[:1, :5]
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.layers[0].residual_dims.attention_output.dtype == torch.int64
    assert torch.isfinite(_logits(half).float()).all()
    with pytest.raises(RuntimeError, match="hf_sparse_structured"):
        _plain_transformers_logits(tmp_path)


def test_lora_trains_on_a_residual_pruned_model():
    from peft import LoraConfig, get_peft_model

    model = build("llama")
    apply_and_describe(get_architecture(model), model, _disp_edits(model))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"]))
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)
    torch.testing.assert_close(_logits(peft_model.merge_and_unload()), _logits(model))


# ---------------------------------------------------------------------------------------------------------------
# The method's math


def test_block_costs_count_exactly_what_the_surgery_keeps():
    for model_type in ("llama", "qwen2"):
        model = build(model_type)
        session = StructuredSession(model, IDS, show_progress=False)
        costs = [block_costs(session, i) for i in range(2)]
        dense = ([torch.ones(64)] * 3 + [torch.ones(128), torch.ones(64)]) * 2
        assert kept_parameters(costs, dense) == block_parameters(session.adapter, model)
        edits = _disp_edits(model)
        masks = _masks_for(edits, 64, 128)
        predicted = kept_parameters(costs, [masks[i][name] for i in range(2) for name in SELECTIONS])
        apply_and_describe(session.adapter, model, edits)
        assert predicted == block_parameters(session.adapter, model)


def test_parameter_count_and_penalty_by_hand():
    # fixed 10; q+k+v rows 3 per read dim, o width 2 per written dim; 2 readers; no biases; hidden 4; 5 channels
    costs = BlockCosts(10, 3, 2, 2, 0, 0, 4, 5)
    assert costs.parameters(4, 4, 4, 5, 4) == 10 + 12 + 8 + 2 * 4 * 5 + 5 * 4
    masks = [torch.tensor([1.0, 0, 0, 1]), torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 1, 1, 0]),
             torch.tensor([1.0, 1, 0, 0, 0]), torch.tensor([0.0, 0, 0, 1])]
    assert kept_parameters([costs], masks) == 10 + 3 * 2 + 2 * 1 + 2 * 3 * 2 + 2 * 1  # 32
    assert parameter_penalty(torch.tensor(32.0), 32.0, 6.0) == 0
    torch.testing.assert_close(parameter_penalty(torch.tensor(16.0), 32.0, 6.0), torch.tensor(6 * 0.6931471805599453))
    torch.testing.assert_close(parameter_penalty(torch.tensor(64.0), 32.0, 6.0), torch.tensor(6 * 0.6931471805599453))


def test_hard_masks_keep_one_dimension_and_pass_sigmoid_gradients():
    scores = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True)
    mask = straight_through_mask(scores)
    assert mask.tolist() == [0.0, 1.0, 0.0]  # nothing above zero: the best one stays
    (mask * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    sigmoid = torch.sigmoid(scores.detach())
    torch.testing.assert_close(scores.grad, torch.tensor([1.0, 2.0, 3.0]) * sigmoid * (1 - sigmoid))
    assert straight_through_mask(torch.tensor([0.5, -0.5, 2.0])).tolist() == [1.0, 0.0, 1.0]


def test_fit_loss_is_the_papers_cross_entropy_or_the_kl_to_the_dense_model():
    model = build("llama")
    with torch.no_grad():
        dense = model(IDS).logits[:, :-1].float()  # (2, 15, vocab)
    torch.testing.assert_close(fit_loss(model, IDS, dense, "ce"),
                               torch.nn.functional.cross_entropy(dense.reshape(-1, dense.shape[-1]),
                                                                 IDS[:, 1:].reshape(-1)))
    assert fit_loss(model, IDS, dense, "kl").abs() < 1e-6  # the dense model fits itself exactly
    shifted = dense.clone()
    shifted[..., 0] += 1.0  # masked logits that differ: KL(p || q) by hand
    p, q = dense.log_softmax(-1), shifted.log_softmax(-1)
    torch.testing.assert_close(fit_loss(model, IDS, shifted, "kl"), (p.exp() * (p - q)).sum(-1).mean())
    assert fit_loss(model, IDS, shifted, "kl") > 0


def test_final_threshold_lands_within_one_dimension_of_the_target():
    model = build("llama")
    session = StructuredSession(model, IDS, show_progress=False)
    costs = [block_costs(session, i) for i in range(2)]
    torch.manual_seed(0)
    scores = [s.detach() for s in SelectionNetwork([64, 64, 64, 128, 64] * 2)()]
    total = block_parameters(session.adapter, model)
    largest_dimension = max(c.attention_rows + c.attention_width + 2 * c.channels + c.channels for c in costs)
    for share in (0.2, 0.5, 0.8):
        masks = threshold_masks(scores, costs, share * total)
        assert abs(kept_parameters(costs, masks) - share * total) <= largest_dimension
        assert all(m.sum() >= 1 for m in masks)
    tiny = threshold_masks(scores, costs, 0.0)  # an unreachable target keeps one dimension everywhere
    assert [int(m.sum()) for m in tiny] == [1] * 10


def test_importance_scores_are_each_dimensions_output_energy():
    model = build("llama")
    session = StructuredSession(model, IDS, show_progress=False)
    scores = importance_scores(session, dense_moments(session))
    assert [s.numel() for s in scores] == [64, 64, 64, 128, 64] * 2
    block = model.model.layers[1]
    seen = {}
    hooks = [getattr(block.self_attn, n).register_forward_hook(
        lambda _m, args, _o, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1])))
        for n in ("q_proj", "o_proj")]
    hooks += [getattr(block.mlp, n).register_forward_hook(
        lambda _m, args, _o, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1])))
        for n in ("gate_proj", "down_proj")]
    _logits(model)
    for h in hooks:
        h.remove()

    def energy(x):
        return x.double().pow(2).mean(0)

    attn, mlp = block.self_attn, block.mlp
    expected = [
        energy(seen["q_proj"]) * sum(getattr(attn, n).weight.double().pow(2).sum(0) for n in ("q_proj", "k_proj",
                                                                                              "v_proj")),
        attn.o_proj.weight.double().pow(2) @ energy(seen["o_proj"]),
        energy(seen["gate_proj"]) * (mlp.gate_proj.weight.double().pow(2).sum(0)
                                     + mlp.up_proj.weight.double().pow(2).sum(0)),
        energy(seen["down_proj"]) * mlp.down_proj.weight.double().pow(2).sum(0),
        mlp.down_proj.weight.double().pow(2) @ energy(seen["down_proj"]),
    ]
    for got, want in zip(scores[5:], expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)


def test_importance_start_is_at_the_target_keeping_the_highest_scores():
    model = build("llama")
    session = StructuredSession(model, IDS, show_progress=False)
    costs = [block_costs(session, i) for i in range(2)]
    scores = importance_scores(session, dense_moments(session))
    total = block_parameters(session.adapter, model)
    largest_dimension = max(c.attention_rows + c.attention_width + 3 * c.channels for c in costs)
    for share in (0.3, 0.7):
        prior = importance_prior(scores, costs, share * total, None)
        masks = [(p > 0).float() for p in prior]
        assert abs(kept_parameters(costs, masks) - share * total) <= largest_dimension
        for s, m in zip(scores, masks):  # within a selection the kept ones are the highest-scoring
            assert s[m.bool()].min() >= s[~m.bool()].max() if 0 < m.sum() < m.numel() else True
    # With a budget per block each block starts at its own budget.
    budgets = [0.4 * c.parameters(c.hidden_size, c.hidden_size, c.hidden_size, c.channels, c.hidden_size)
               for c in costs]
    prior = importance_prior(scores, costs, sum(budgets), budgets)
    kept = [c.parameters(*[(p > 0).sum() for p in prior[5 * i: 5 * i + 5]]) for i, c in enumerate(costs)]
    assert all(abs(k - b) <= largest_dimension for k, b in zip(kept, budgets))


def test_compensation_biases_replace_the_cut_inputs_by_their_dense_means():
    model = build("llama")
    session = StructuredSession(model, IDS, show_progress=False)
    moments = dense_moments(session)
    generator = torch.Generator().manual_seed(3)
    masks = [(torch.rand(n, generator=generator) < 0.6).float() for n in (64, 64, 64, 128, 64)]
    biases = compensation_biases(session, 1, moments[1], masks)
    attn_in, _, mlp_in, channels, mlp_out = (m.bool() for m in masks)
    assert sorted(biases) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                              "self_attn.q_proj", "self_attn.v_proj"]
    x = torch.randn(5, 64, generator=generator)
    h = torch.randn(5, 128, generator=generator)
    cases = [("self_attn.q_proj", x, attn_in, "self_attn.q_proj", slice(None)),
             ("self_attn.v_proj", x, attn_in, "self_attn.q_proj", slice(None)),
             ("mlp.up_proj", x, mlp_in, "mlp.gate_proj", channels),
             ("mlp.down_proj", h, channels, "mlp.down_proj", mlp_out)]
    for name, inputs, kept, observed, rows in cases:
        weight = session.weight(1, name)
        filled = torch.where(kept, inputs, moments[1][observed].mean.float())  # cut inputs at their dense mean
        expected = (filled @ weight.T)[:, rows]
        pruned = inputs[:, kept] @ weight[rows][:, kept].T + biases[name]
        torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The method end to end (tiny)


def _config(sparsity=0.3, seed=0, **options):
    options = {"steps": 6, "windows_per_step": 2, **options}
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return hf_sparse.SparsityConfig(method="disp_llm", pattern="structured", sparsity=sparsity,
                                    calibration=calibration, num_samples=4, sequence_length=32, seed=seed,
                                    method_options=options)


def test_disp_llm_hits_the_target_is_deterministic_and_reloads(tmp_path):
    first, second, other = build("llama"), build("llama"), build("llama")
    record = hf_sparse.prune(first, _config(), show_progress=False)
    assert record.method == "disp_llm" and record.method_options["lam"] == 1.0
    assert record.overall_sparsity == 1 - record.structure["block_parameters"] / \
        record.structure["original"]["block_parameters"]
    assert abs(record.overall_sparsity - 0.3) < 0.02
    assert all("residual_dims" in b for b in record.structure["blocks"])
    assert hf_sparse.prune(second, _config(), show_progress=False).structure == record.structure
    assert torch.equal(_logits(first), _logits(second))
    assert hf_sparse.prune(other, _config(seed=1, lr=0.05), show_progress=False).structure != record.structure
    first.save_pretrained(tmp_path)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(first))


def test_masking_with_dense_mean_fills_equals_surgery_with_compensation_biases():
    model = build("llama")
    session = StructuredSession(model, IDS, show_progress=False)
    moments = dense_moments(session)
    edits = _disp_edits(model)
    masks = _masks_for(edits, model.config.hidden_size, 128)
    for index, edit in edits.blocks.items():
        ordered = [masks[index][name] for name in SELECTIONS]
        edit.new_biases.update(compensation_biases(session, index, moments[index], ordered))
    with torch.no_grad(), masked_residual(model, session.adapter, masks, compensation_fills(session, moments)):
        filled = _logits(model)
    with torch.no_grad(), masked_residual(model, session.adapter, masks):
        zeroed = _logits(model)
    apply_edits(model, session.adapter, edits)
    torch.testing.assert_close(_logits(model), filled, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(filled, zeroed, atol=1e-3)  # the biases do change the model


def test_bias_compensation_is_recorded_and_reloads_bit_identically(tmp_path):
    model = build("llama")
    record = hf_sparse.prune(model, _config(bias_compensation=True), show_progress=False)
    biased = [b.get("new_biases", []) for b in record.structure["blocks"]]
    assert any("mlp.down_proj" in b and "self_attn.q_proj" in b for b in biased), biased
    assert model.model.layers[0].self_attn.q_proj.bias is not None or "self_attn.q_proj" not in biased[0]
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


def test_unsupported_architecture_fails_before_weights_load(tmp_path):
    model = build("gpt_neox")
    with pytest.raises(ValueError, match=r"architecture 'gpt_neox' does not support structured pruning of "
                                         r"residual_dims: parallel residual"):
        hf_sparse.prune(model, _config(), show_progress=False)


@pytest.mark.parametrize("options,message", [
    ({"steps": 0}, "steps"), ({"lam": 0.0}, "lam"), ({"lr": -1.0}, "lr"), ({"temperature": 0.0}, "temperature"),
    ({"windows_per_step": 0}, "windows_per_step"), ({"loss": "mse"}, "loss"), ({"lambda": 6}, "unknown option"),
    ({"init": "zeros"}, "init"), ({"bias_compensation": "yes"}, "bias_compensation"),
])
def test_disp_llm_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        _config(**options)


def test_cli_prunes_with_disp_llm_and_the_checkpoint_reloads(tmp_path):
    from conftest import DEMO_CALIBRATION, save_tiny_with_demo_tokenizer
    from hf_sparse import cli

    tiny = save_tiny_with_demo_tokenizer(tmp_path / "tiny-llama")
    output = tmp_path / "disp"
    assert cli.main([str(a) for a in [
        "prune", tiny, "--method", "disp_llm", "--pattern", "structured", "--sparsity", 0.3,
        "--method-option", "steps=3", "--method-option", "windows_per_step=2",
        "--calibration", DEMO_CALIBRATION, "--num-samples", 4, "--sequence-length", 32, "--batch-size", 2,
        "--output", output]]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output)
    record = hf_sparse.read_record(reloaded)
    assert record.method == "disp_llm" and record.method_options["steps"] == 3
    assert abs(record.overall_sparsity - 0.3) < 0.05
    assert torch.isfinite(_logits(reloaded)).all()
    card = (output / "README.md").read_text()
    assert "DISP-LLM" in card and "residual dims read/written" in card


# ---------------------------------------------------------------------------------------------------------------
# The real 7M model (short)


@pytest.mark.slow
def test_real_model_importance_start_is_better_than_a_random_one_before_training(model_dir):
    from conftest import CALIBRATION_TXT, TEST_TXT

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEST_TXT.read_text()[:20000], return_tensors="pt").input_ids[:, : 4 * 256].reshape(4, 256)
    losses = {}
    for init in ("importance", "random"):  # one step with a negligible lr: the start itself, thresholded
        cfg = hf_sparse.SparsityConfig(method="disp_llm", pattern="structured", sparsity=0.3,
                                       calibration=str(CALIBRATION_TXT), num_samples=8, sequence_length=128,
                                       method_options={"steps": 1, "windows_per_step": 1, "lr": 1e-9, "init": init})
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, sparsity_config=cfg)
        assert abs(hf_sparse.read_record(model).overall_sparsity - 0.3) < 0.005
        with torch.no_grad():
            losses[init] = model(ids, labels=ids).loss.item()
    # The random start keeps an arbitrary 70%; the importance start the dimensions that carry the most output.
    assert losses["importance"] < losses["random"] - 0.5, losses


@pytest.mark.slow
def test_real_model_reaches_the_target_with_a_sane_perplexity(model_dir, tmp_path):
    from conftest import CALIBRATION_TXT, TEST_TXT

    cfg = hf_sparse.SparsityConfig(method="disp_llm", pattern="structured", sparsity=0.3,
                                   calibration=str(CALIBRATION_TXT), num_samples=8, sequence_length=128,
                                   method_options={"steps": 40, "windows_per_step": 2, "lr": 0.01})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, sparsity_config=cfg)
    record = hf_sparse.read_record(model)
    assert abs(record.overall_sparsity - 0.3) < 0.005
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEST_TXT.read_text()[:20000], return_tensors="pt").input_ids[:, : 4 * 256].reshape(4, 256)
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        pruned_loss, dense_loss = model(ids, labels=ids).loss.item(), dense(ids, labels=ids).loss.item()
    assert dense_loss < pruned_loss < dense_loss + 1.5  # worse than dense, far from broken
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), ids[:1]),
                       _logits(model, ids[:1]))


@pytest.mark.slow
def test_start_study_shows_the_residual_shift_beats_cutting_every_selection_alike(model_dir, capsys, restore_threads):
    from conftest import import_example

    study = import_example("disp_start_study")
    study.main(["--sparsities", "0.3", "--shifts", "0,2", "--eval-windows", "4", "--threads", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.3 |")]
    assert len(rows) == 2
    no_shift, shift = (float(row[5]) for row in rows)
    assert abs(float(rows[0][3]) - 0.3) < 0.005 and abs(float(rows[1][3]) - 0.3) < 0.005
    assert shift < no_shift  # 7M model, 8 windows: 44.82 against 59.19
