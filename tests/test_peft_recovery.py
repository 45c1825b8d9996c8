"""Sparsity-keeping PEFT: masked LoRA / mask-at-merge / HiRA, adapter save-reload, Trainer and plain-loop training,
and LoRA recovery on the real model."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import HiraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

import hf_sparse
from hf_sparse.masks import is_valid_n_m
from hf_sparse.record import overall_sparsity
from hf_sparse.training import KeepSparsityCallback, MaskKeeper, keep_sparsity

from conftest import CALIBRATION_TXT, TEST_TXT, load_pretrained, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pruned_tiny(pattern: str = "2:4", seed: int = 0, **overrides) -> nn.Module:
    model = tiny_llama(seed, **overrides)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=None
                                                    if pattern != "unstructured" else 0.5), show_progress=False)
    return model


def batch(seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
    """Real optimizer steps with a non-zero learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().clone() for name in names}


def assert_same_sparsity(model: nn.Module, masks: dict[str, torch.Tensor], pattern: str) -> None:
    """Every pruned weight still exactly zero, the same masks, N:M groups valid, achieved sparsity as recorded."""
    record = hf_sparse.read_record(model)
    after = hf_sparse.get_masks(model)  # strict: each module's zero count equals the record's
    for name, mask in masks.items():
        assert torch.equal(after[name], mask), name
        weight = dict(model.named_modules())[name].weight
        assert (weight[~mask] == 0).all(), name
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert is_valid_n_m(weight, n, m), name
    assert overall_sparsity(model, record.modules) == pytest.approx(record.overall_sparsity, abs=1e-6)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("mode", ["masked", "merge"])
def test_lora_merge_keeps_every_zero(pattern, mode):
    model = pruned_tiny(pattern)
    masks = hf_sparse.get_masks(model)
    before = weights(model, masks)
    expected_sparsity = 0.5
    assert overall_sparsity(model, masks) == pytest.approx(expected_sparsity, abs=1e-9)

    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"), mode=mode)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, hf_sparse.peft.SparseLoraLinear)
    assert torch.equal(layer.sparsity_mask, masks["model.layers.0.self_attn.q_proj"])
    train_steps(peft_model)
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapters really trained
    merged = peft_model.merge_and_unload()

    assert_same_sparsity(merged, masks, pattern)
    assert overall_sparsity(merged, masks) == pytest.approx(expected_sparsity, abs=1e-9)
    after = weights(merged, masks)
    for name, mask in masks.items():
        assert not torch.equal(after[name][mask], before[name][mask]), f"{name}: merge changed nothing"
    # The adapter wrappers and masks are gone: a plain model with plain nn.Linear layers and an unchanged record.
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert not any("sparsity_mask" in name for name, _ in merged.named_buffers())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_plain_peft_merge_makes_the_model_dense(pattern):
    """The contrast: the same training with peft alone fills every zero in."""
    model = pruned_tiny(pattern)
    masks = hf_sparse.get_masks(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train_steps(peft_model)
    merged = peft_model.merge_and_unload()
    assert overall_sparsity(merged, masks) < 0.001
    with pytest.raises(ValueError, match="changed after pruning"):
        hf_sparse.get_masks(merged)


def test_masked_training_forward_equals_merged_model():
    model = pruned_tiny("2:4")
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train_steps(peft_model)
    ids = batch(99)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    assert adapted.abs().max() > 0.1
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5)


def test_merge_mode_trains_a_model_that_merging_then_changes():
    """mode='merge' ends sparse but is the weaker choice: the trained (dense-update) model is not the merged one."""
    model = pruned_tiny("2:4")
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"),
                                                      mode="merge")
    train_steps(peft_model)
    ids = batch(99)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert (adapted - merged).abs().max() > 1e-3


def test_saved_adapter_reloads_and_merges_to_the_same_weights(tmp_path):
    model = pruned_tiny("2:4")
    fresh = copy.deepcopy(model)
    manual = copy.deepcopy(model)
    unregistered = copy.deepcopy(model)
    masks = hf_sparse.get_masks(model)
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train_steps(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    in_memory = weights(peft_model.merge_and_unload(), masks)

    reloaded = hf_sparse.peft.load_sparse_adapter(fresh, str(tmp_path / "adapter")).merge_and_unload()
    for name, weight in weights(reloaded, masks).items():
        assert torch.equal(weight, in_memory[name]), name
    assert_same_sparsity(reloaded, masks, "2:4")

    # By hand: re-register the custom module on the loaded config, then peft's own PeftModel.from_pretrained.
    config = hf_sparse.peft.register_sparse_lora(LoraConfig.from_pretrained(tmp_path / "adapter"))
    by_hand = PeftModel.from_pretrained(manual, tmp_path / "adapter", config=config).merge_and_unload()
    for name, weight in weights(by_hand, masks).items():
        assert torch.equal(weight, in_memory[name]), name

    # Without re-registering (peft does not serialize it) the merge is dense again: why the step is needed.
    dense = PeftModel.from_pretrained(unregistered, tmp_path / "adapter").merge_and_unload()
    assert overall_sparsity(dense, masks) < 0.001


def test_hira_keeps_sparsity_after_training_and_merge():
    model = pruned_tiny("2:4")
    masks = hf_sparse.get_masks(model)
    before = weights(model, masks)
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, HiraConfig(r=4, target_modules=TARGETS))
    train_steps(peft_model)
    merged = peft_model.merge_and_unload()
    assert_same_sparsity(merged, masks, "2:4")
    assert any(not torch.equal(w, before[n]) for n, w in weights(merged, masks).items())


def _trainer_dataset(n: int = 8):
    return [{"input_ids": batch(i)[0], "labels": batch(i)[0]} for i in range(n)]


def _trainer(model, tmp_path, callbacks):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=_trainer_dataset(), callbacks=callbacks)


def test_full_finetuning_with_trainer_callback_keeps_masks(tmp_path):
    model = pruned_tiny("2:4")
    masks = hf_sparse.get_masks(model)
    before = weights(model, masks)
    _trainer(model, tmp_path, [KeepSparsityCallback()]).train()
    assert_same_sparsity(model, masks, "2:4")
    assert all(not torch.equal(w, before[n]) for n, w in weights(model, masks).items())

    unkept = pruned_tiny("2:4")
    _trainer(unkept, tmp_path, []).train()
    with pytest.raises(ValueError, match="changed after pruning"):
        hf_sparse.get_masks(unkept)  # without the callback weight decay and Adam fill the zeros in


def test_sparse_lora_with_trainer(tmp_path):
    model = pruned_tiny("unstructured")
    masks = hf_sparse.get_masks(model)
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    _trainer(peft_model, tmp_path, []).train()
    assert peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.abs().sum() > 0
    assert_same_sparsity(peft_model.merge_and_unload(), masks, "unstructured")


def test_plain_loop_keep_sparsity_hooks_the_optimizer():
    model = pruned_tiny("2:4")
    masks = hf_sparse.get_masks(model)
    before = weights(model, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    keeper = keep_sparsity(model, optimizer)
    assert len(keeper) == len(masks)
    model.train()
    for step in range(3):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_sparsity(model, masks, "2:4")
    assert all(not torch.equal(w, before[n]) for n, w in weights(model, masks).items())
    keeper.detach()  # after detaching, steps fill zeros in again
    model(input_ids=batch(7), labels=batch(7)).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="changed after pruning"):
        hf_sparse.get_masks(model)


def test_accelerate_loop_keeps_masks():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = pruned_tiny("unstructured")
    masks = hf_sparse.get_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    keep_sparsity(model, optimizer)  # hooks the torch optimizer inside accelerate's wrapper
    for step in range(3):
        ids = batch(step)
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    assert_same_sparsity(accelerator.unwrap_model(model), masks, "unstructured")


def test_mask_keeper_by_hand_on_a_peft_wrapped_model():
    model = pruned_tiny("2:4")
    masks = hf_sparse.get_masks(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    keeper = MaskKeeper(peft_model)  # resolves module names through the PeftModel and LoRA wrappers
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[0] > 8:
                module.weight.add_(0.5)
    keeper.apply()
    base = peft_model.get_base_model()
    for name, mask in masks.items():
        weight = dict(base.named_modules())[name].get_base_layer().weight
        assert (weight[~mask] == 0).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not pruned by hf_sparse"):
        hf_sparse.peft.get_sparse_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="mode must be one of"):
        hf_sparse.peft.get_sparse_peft_model(pruned_tiny(), LoraConfig(r=2), mode="dense")
    with pytest.raises(ValueError, match="use_dora"):
        hf_sparse.peft.get_sparse_peft_model(pruned_tiny(), LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        hf_sparse.peft.get_sparse_peft_model(pruned_tiny(), LoraConfig(r=2, target_modules="all-linear",
                                                                       init_lora_weights="pissa"))


def test_warns_about_kbit_preparation_of_an_unquantized_model(caplog):
    from peft import prepare_model_for_kbit_training

    model = pruned_tiny("2:4").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="hf_sparse.integrations.peft"):
        hf_sparse.peft.get_sparse_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    assert "prepare_model_for_kbit_training" not in caplog.text
    prepared = prepare_model_for_kbit_training(model)  # upcasts every weight to float32
    assert all(p.dtype == torch.float32 for p in prepared.parameters())
    with caplog.at_level(logging.WARNING, logger="hf_sparse.integrations.peft"):
        hf_sparse.peft.get_sparse_peft_model(prepared, LoraConfig(r=2, target_modules="all-linear"))
    assert "prepare_model_for_kbit_training" in caplog.text


@pytest.mark.slow  # the real tokenizer and texts in ../shared
def test_recover_command_end_to_end(tmp_path, tokenizer, capsys):
    """``hf-sparse recover`` on a tiny model with the real tokenizer (LM objective: an in-memory model has no base
    model to distil from): saves a sparse checkpoint with its card and prints a rounded summary naming the output."""
    import json

    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from hf_sparse.cli import build_parser
    from hf_sparse.cli.recover import run as run_recover

    model = pruned_tiny("2:4", vocab_size=len(tokenizer))
    masks = hf_sparse.get_masks(model)
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    text = CALIBRATION_TXT.read_text(encoding="utf-8")[:20000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "test.txt").write_text(TEST_TXT.read_text(encoding="utf-8")[:8000], encoding="utf-8")

    args = build_parser().parse_args([
        "recover", str(tmp_path / "pruned"), "--data", str(tmp_path / "train.txt"), "--output", str(tmp_path / "out"),
        "--objective", "lm", "--steps", "4", "--batch-size", "2", "--sequence-length", "32", "--rank", "2",
        "--lr", "1e-2", "--eval-data", str(tmp_path / "test.txt"), "--eval-sequence-length", "32",
        "--max-windows", "4", "--license", "apache-2.0",
    ])
    summary = args.func(args)
    assert args.func is run_recover and summary["overall_sparsity"] == 0.5

    printed = capsys.readouterr().out
    import re

    assert re.search(rf"^saved to\s+{re.escape(str(tmp_path / 'out'))}$", printed, re.M), printed
    assert re.search(rf"^final training loss\s+{summary['final_loss']:.4f}$", printed, re.M), printed
    assert "=" not in printed and "{" not in printed  # a table, not key=value pairs or log dicts
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["sparsity_config"]
    assert saved["recovery"]["mode"] == "masked" and saved["recovery"]["steps"] == 4
    assert saved["recovery"]["objective"] == "lm" and saved["recovery"]["tokens"] == 4 * 2 * 32
    assert saved["evaluation"]["recovered_perplexity"] == summary["recovered_perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_same_sparsity(reloaded, masks, "2:4")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0" and "lora-recovery" in card.data.tags
    assert f"{summary['recovered_perplexity']:.2f}" in card.text


@pytest.mark.slow
def test_lora_recovery_lowers_perplexity_and_keeps_2_4(tokenizer, heldout_text):
    """Wanda 2:4 on the real model, 30 steps of masked LoRA on the LM loss: lower perplexity, identical 2:4 masks."""
    from hf_sparse.evaluation import perplexity
    from hf_sparse.recovery import recover

    model = load_pretrained()
    cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration=str(CALIBRATION_TXT), num_samples=16,
                                   sequence_length=128, seed=0)
    hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
    masks = hf_sparse.get_masks(model)

    def ppl(m):
        return perplexity(m, tokenizer, heldout_text, sequence_length=256, max_windows=40, show_progress=False)

    pruned = ppl(model)
    result = recover(model, tokenizer, str(CALIBRATION_TXT), objective="lm", steps=30, batch_size=4,
                     sequence_length=128, learning_rate=2e-3, rank=8, show_progress=False)
    recovered = ppl(result.model)
    assert_same_sparsity(result.model, masks, "2:4")
    assert recovered < pruned - 0.5, (pruned, recovered)
    assert hf_sparse.read_record(result.model).recovery["steps"] == 30


@pytest.mark.parametrize("overrides, step", [({"learning_rate": 1e30}, 2)])
def test_recover_fails_on_a_non_finite_loss_naming_the_step(overrides, step):
    """A huge learning rate (NaN after the first update; an infinite one is refused up front) stops the run with the
    step, instead of merging a NaN model and reporting it as recovered. (1-token windows, which have no next token,
    are refused up front: sequence_length must be >= 2.)"""
    from hf_sparse.recovery import recover

    model = pruned_tiny("2:4")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    options = {"steps": 3, "batch_size": 2, "sequence_length": 8, "rank": 2, "objective": "lm", **overrides}
    with pytest.raises(ValueError, match=rf"recovery loss is nan at step {step} of 3; training stopped, the model is "
                                         "not recovered"):
        recover(model, None, ids, show_progress=False, **options)
    with pytest.raises(ValueError, match="sequence_length must be an integer >= 2, got 1"):
        recover(pruned_tiny("2:4"), None, ids, show_progress=False, **{**options, "sequence_length": 1})
