"""Every supported family, as a tiny random model: the engine finds its blocks and groups, prunes every linear of
every block to the exact target, and the pruned model still runs."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import hf_sparse
from hf_sparse.architectures import ARCHITECTURES, get_architecture
from hf_sparse.masks import is_valid_n_m

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "opt": lambda: transformers.OPTConfig(**COMMON, ffn_dim=128, word_embed_proj_dim=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**COMMON, intermediate_size=128),
    "phi": lambda: transformers.PhiConfig(**COMMON, intermediate_size=128),
    "phi3": lambda: transformers.Phi3Config(**COMMON, intermediate_size=128, pad_token_id=0),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, intermediate_size=128, num_key_value_heads=1, head_dim=16),
    # A sliding window shorter than the calibration windows, so sliding and full layers really see different masks.
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                                sliding_window=8),
    # QK-norms, one KV head, a sliding layer (local rotary base) then a full one (global base), as in Gemma 3.
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, intermediate_size=128, num_key_value_heads=1,
                                                         head_dim=16, sliding_window=8,
                                                         layer_types=["sliding_attention", "full_attention"]),
}


def build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]()).eval()


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    adapter = get_architecture(model)
    prefix = adapter.block_prefix(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_groups_name_real_linears(model_type):
    model = build(model_type)
    adapter = get_architecture(model)
    block = adapter.blocks(model)[0]
    linear_names = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    grouped = {name for group in adapter.operator_groups for name in group}
    # Every operator of the block is placed in an execution-order group, and every group names a real module.
    assert grouped == linear_names


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured")])
def test_prune_every_architecture(model_type, method, pattern):
    model = build(model_type)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = hf_sparse.SparsityConfig(method=method, pattern=pattern, sparsity=0.5, calibration=ids,
                                   num_samples=4, sequence_length=32, batch_size=2)
    head_before = model.get_output_embeddings().weight.detach().clone()
    record = hf_sparse.prune(model, cfg, show_progress=False)
    linears = block_linears(model)
    assert set(record.modules) == set(linears)
    for name, module in linears.items():
        assert (module.weight == 0).float().mean().item() == 0.5, name
        if pattern == "2:4":
            assert is_valid_n_m(module.weight, 2, 4), name
    assert torch.equal(model.get_output_embeddings().weight, head_before)  # lm_head is never pruned by default
    logits = model(ids[:1]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_pruned_architecture_saves_and_reloads(model_type, tmp_path):
    model = build(model_type)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration=ids, num_samples=4, sequence_length=32,
                                   batch_size=2)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf_sparse.read_record(reloaded) == record
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:1]).logits, model(ids[:1]).logits)


def _inputs_the_model_gives(model, ids) -> list[dict]:
    """The keyword inputs each decoder block receives in an ordinary forward pass."""
    seen = []
    blocks = get_architecture(model).blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_each_block_gets_its_own_mask_and_rotary_inputs(model_type):
    from hf_sparse.engine import capture_block_inputs

    model = build(model_type)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    blocks = get_architecture(model).blocks(model)
    inputs = capture_block_inputs(model, blocks[0], ids, batch_size=2, device=torch.device("cpu"), blocks=blocks)
    expected = _inputs_the_model_gives(model, ids)
    for index in range(len(blocks)):
        got = inputs.for_block(index).kwargs[0]
        for key in ("attention_mask", "position_embeddings"):
            assert _same(got[key], expected[index][key]), (index, key)
    # The two layer types really get different inputs here (else this test would prove nothing).
    assert not all(_same(expected[0][k], expected[1][k]) for k in ("attention_mask", "position_embeddings"))
    # The blocks' own forward is back in place after the capture.
    assert all("forward" not in vars(block) for block in blocks)


def test_blocks_with_one_layer_type_share_their_inputs():
    from hf_sparse.engine import capture_block_inputs

    model = build("llama")
    blocks = get_architecture(model).blocks(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, blocks[0], ids, batch_size=2, device=torch.device("cpu"), blocks=blocks)
    assert inputs.block_kwargs is None and inputs.for_block(1) is inputs


def test_every_registered_family_is_covered():
    assert set(TINY_CONFIGS) <= set(ARCHITECTURES)


def test_unsupported_architecture_names_the_fix():
    model = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(ValueError, match=r"model_type 'bert'.*register_architecture"):
        hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude"))
