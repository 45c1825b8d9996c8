"""Structured pruning: exact surgery math on every architecture (or the clear error), block removal with the KV cache,
the shape record, save/reload (with and without hf_sparse), and the three methods on tiny models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

import hf_sparse
from hf_sparse.architectures import get_architecture
from hf_sparse.record import SparsityRecord, write_record
from hf_sparse.surgery import (
    AttentionEdit,
    BlockEdit,
    MLPEdit,
    StructuredEdits,
    apply_and_describe,
    block_parameters,
    block_shape,
    unit_parameters,
    validate_structure,
)
from hf_sparse.surgery.apply import _submodule
from test_architectures import TINY_CONFIGS, build

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _structure_supported(model, name) -> bool:
    try:
        get_architecture(model).structure(name, model.config.model_type)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Surgery math: a removed head/channel gives exactly the dense model with those columns of o_proj/down_proj zeroed.


def _heads_edit(shape) -> tuple[AttentionEdit, list[int]]:
    """Drop key/value group 0 entirely and, with GQA, one query head of every other group (with a single key/value
    group, as in Gemma 1/3 configs, keep it and drop its first query head). Returns the edit and the removed query
    heads."""
    per_group = shape.attention_heads // shape.kv_heads
    if shape.kv_heads == 1:
        kept_groups, kept_query = (0,), tuple(range(1, per_group))
    elif per_group > 1:
        kept_groups = tuple(range(1, shape.kv_heads))
        kept_query = tuple(g * per_group + r for g in kept_groups for r in range(1, per_group))
    else:
        kept_groups = kept_query = tuple(range(1, shape.kv_heads))
    removed = [h for h in range(shape.attention_heads) if h not in kept_query]
    return AttentionEdit(kept_groups, kept_query), removed


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("structure", ["attention_heads", "mlp_channels"])
def test_surgery_is_exact_or_names_the_unsupported_structure(model_type, structure):
    model = build(model_type)
    adapter = get_architecture(model)
    if not _structure_supported(model, structure):
        edit = BlockEdit(attention=AttentionEdit((0,), (0,))) if structure == "attention_heads" \
            else BlockEdit(mlp=MLPEdit((0,)))
        with pytest.raises(ValueError, match=rf"architecture '{model_type}' does not support structured pruning of "
                                             rf"{structure}: \w"):
            hf_sparse.surgery.apply_edits(model, adapter, StructuredEdits(blocks={0: edit}))
        return
    reference = copy.deepcopy(model)
    block, ref_block = adapter.blocks(model)[0], adapter.blocks(reference)[0]
    shape = block_shape(adapter, block)
    torch.manual_seed(3)
    if structure == "attention_heads":
        decl = adapter.attention_heads
        edit, removed = _heads_edit(shape)
        block_edit = BlockEdit(attention=edit)
        cols = torch.cat([torch.arange(h * shape.head_dim, (h + 1) * shape.head_dim) for h in removed])
        output_name = decl.output
    else:
        decl = adapter.mlp_channels
        removed = [0, 5, 7, shape.mlp_channels - 1]
        block_edit = BlockEdit(mlp=MLPEdit(tuple(c for c in range(shape.mlp_channels) if c not in removed)))
        cols = torch.tensor(removed)
        output_name = decl.output
    out_features = _submodule(block, output_name).out_features
    block_edit.new_biases[output_name] = torch.randn(out_features)
    with torch.no_grad():
        ref_out = _submodule(ref_block, output_name)
        ref_out.weight[:, cols] = 0
        if ref_out.bias is None:
            ref_out.bias = nn.Parameter(torch.zeros(out_features))
        ref_out.bias += block_edit.new_biases[output_name]
    before = block_parameters(adapter, model)
    hf_sparse.surgery.apply_edits(model, adapter, StructuredEdits(blocks={0: block_edit}))
    after = block_shape(adapter, block)
    if structure == "attention_heads":
        assert after.attention_heads == shape.attention_heads - len(removed)
        assert after.head_dim == shape.head_dim
        assert after.attention_heads % after.kv_heads == 0
    else:
        assert after.mlp_channels == shape.mlp_channels - len(removed)
    assert block_parameters(adapter, model) < before
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_block_removal_renumbers_for_the_kv_cache(model_type):
    model = build(model_type)
    model.config.num_hidden_layers  # noqa: B018  (exists in every family)
    adapter = get_architecture(model)
    layers_before = len(adapter.blocks(model))
    structure = apply_and_describe(adapter, model, StructuredEdits(removed_blocks=(0,)))
    assert len(adapter.blocks(model)) == model.config.num_hidden_layers == layers_before - 1
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == layers_before - 1
    assert structure["loading"] == "config" and structure["removed_blocks"] == [0]
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_unit_parameters_count_exactly_what_removal_removes():
    model = build("llama")  # 4 heads, 2 key/value heads, head_dim 16, hidden 64, MLP 128
    adapter = get_architecture(model)
    costs = unit_parameters(adapter, adapter.blocks(model)[0])
    assert costs == {"query_head": 2 * 16 * 64, "kv_group": 2 * (2 * 16 * 64) + 2 * 16 * 64, "mlp_channel": 3 * 64}
    before = block_parameters(adapter, model)
    apply_and_describe(adapter, model, StructuredEdits(blocks={
        0: BlockEdit(attention=AttentionEdit.whole_groups((1,), 2), mlp=MLPEdit(tuple(range(1, 128))))}))
    assert before - block_parameters(adapter, model) == costs["kv_group"] + costs["mlp_channel"]


def test_gqa_edit_must_keep_the_same_heads_per_group():
    edit = AttentionEdit((0, 1), (0, 2, 3))
    with pytest.raises(ValueError, match="same number of query heads"):
        edit.validate(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="not kept"):
        AttentionEdit((0,), (0, 2)).validate(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="strictly increasing"):
        MLPEdit((3, 1))
    with pytest.raises(ValueError, match="both edited and removed"):
        StructuredEdits(blocks={1: BlockEdit(mlp=MLPEdit((0,)))}, removed_blocks=(1,))


# ---------------------------------------------------------------------------------------------------------------
# Record, config and loading


def _record(model, structure) -> SparsityRecord:
    record = SparsityRecord(method="flap", pattern="structured", target_sparsity=0.3, modules={},
                            overall_sparsity=hf_sparse.surgery.removed_fraction(structure), structure=structure)
    write_record(model, record)
    return record


def _uneven_edits() -> StructuredEdits:
    return StructuredEdits(blocks={
        0: BlockEdit(attention=AttentionEdit.whole_groups((1,), 2), mlp=MLPEdit(tuple(range(0, 128, 2))),
                     new_biases={"mlp.down_proj": torch.full((64,), 0.25)}),
        1: BlockEdit(mlp=MLPEdit(tuple(range(100)))),
    })


def test_uneven_blocks_save_and_reload_bit_identically(tmp_path):
    model = build("llama")
    adapter = get_architecture(model)
    structure = apply_and_describe(adapter, model, _uneven_edits())
    assert structure["loading"] == "hf_sparse"
    assert [b["mlp_channels"] for b in structure["blocks"]] == [64, 100]
    assert structure["blocks"][0]["new_biases"] == ["mlp.down_proj"]
    _record(model, structure)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == {"quant_method": "hf_sparse_structured"}
    assert saved["sparsity_config"]["format_version"] == 2
    assert saved["intermediate_size"] == 128  # dense widths stay: the record carries the per-block ones
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), expected)
    assert not getattr(reloaded, "is_quantized", False) and not hasattr(reloaded, "hf_quantizer")
    assert hf_sparse.get_masks(reloaded) == {}
    # Saved again, it still reloads (the marker is kept), and other dtypes / device maps build the same shapes.
    reloaded.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")), expected)
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert half.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    assert half.model.layers[0].mlp.down_proj.bias.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.num_key_value_groups == 2


def test_even_widths_rewrite_the_config(tmp_path):
    model = build("llama")
    adapter = get_architecture(model)
    edit = lambda: BlockEdit(attention=AttentionEdit((0, 1), (0, 2)), mlp=MLPEdit(tuple(range(96))))  # noqa: E731
    structure = apply_and_describe(adapter, model, StructuredEdits(blocks={0: edit(), 1: edit()}))
    assert structure["loading"] == "config"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim,
            model.config.intermediate_size) == (2, 2, 16, 96)
    assert not hasattr(model.config, "quantization_config")
    _record(model, structure)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(_plain_transformers_logits(tmp_path)), expected)


def test_even_widths_the_config_class_refuses_keep_the_dense_config(tmp_path):
    # 3 of 4 heads left in every block: one shape, but Llama's config refuses hidden_size 64 over 3 heads when saved,
    # so the checkpoint keeps the dense keys and loads through hf_sparse (found by per-block targets: the same share
    # in every block gives every block the same shape).
    from conftest import tiny_llama

    model = tiny_llama(num_key_value_heads=4)
    adapter = get_architecture(model)
    edit = lambda: BlockEdit(attention=AttentionEdit((1, 2, 3), (1, 2, 3)))  # noqa: E731
    structure = apply_and_describe(adapter, model, StructuredEdits(blocks={0: edit(), 1: edit()}))
    assert structure["loading"] == "hf_sparse"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 4)
    _record(model, structure)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [block_shape(adapter, b).attention_heads for b in adapter.blocks(reloaded)] == [3, 3]
    assert torch.equal(_logits(reloaded), expected)


def _plain_transformers_logits(path) -> torch.Tensor:
    """Load ``path`` in a subprocess where hf_sparse cannot be imported and return its logits on IDS."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_sparse"] = None  # any import of hf_sparse fails
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})
        ids = torch.load({str(path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(ids).logits, {str(path / "plain_logits.pt")!r})
    """)
    torch.save(IDS, path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return _Logits(torch.load(path / "plain_logits.pt"))


class _Logits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.value = logits

    def forward(self, ids):
        return transformers.modeling_outputs.CausalLMOutput(logits=self.value)


def test_layer_removal_loads_in_plain_transformers(tmp_path):
    model = build("llama")
    cfg = hf_sparse.SparsityConfig(method="shortgpt", pattern="structured", sparsity=0.5, calibration=IDS,
                                   num_samples=2, sequence_length=16)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    assert record.overall_sparsity == 0.5 and record.structure["loading"] == "config"
    assert model.config.num_hidden_layers == 1
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(_plain_transformers_logits(tmp_path)), expected)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)), expected)


def test_uneven_checkpoint_without_hf_sparse_fails_naming_it(tmp_path):
    model = build("llama")
    structure = apply_and_describe(get_architecture(model), model, _uneven_edits())
    _record(model, structure)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="model type `hf_sparse_structured` but Transformers does not recognize"):
        _plain_transformers_logits(tmp_path)
    # The same model type mechanism as compact checkpoints, in the file only: the model in memory keeps its type.
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hf_sparse_structured" and saved["hf_sparse_original_model_type"] == "llama"
    assert model.config.model_type == "llama" and "id2label" not in saved
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "llama"


def test_structure_record_is_validated():
    model = build("llama")
    structure = apply_and_describe(get_architecture(model), model, _uneven_edits())
    assert validate_structure(copy.deepcopy(structure)) == structure
    bad = copy.deepcopy(structure)
    bad["blocks"][1]["attention_heads"] = 3  # 2 key/value heads
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        validate_structure(bad)
    bad = copy.deepcopy(structure)
    bad["blocks"].pop()
    with pytest.raises(ValueError, match="remaining blocks"):
        validate_structure(bad)
    with pytest.raises(ValueError, match="version"):
        validate_structure({**structure, "version": 9})
    # A format_version 1 record (unstructured, no "structure") is still read.
    v1 = {"format": "hf_sparse", "format_version": 1, "method": "wanda", "pattern": "2:4", "target_sparsity": 0.5,
          "overall_sparsity": 0.5, "modules": {"model.layers.0.mlp.up_proj": 0.5}}
    assert SparsityRecord.from_dict(v1).structure is None


def test_config_accepts_structured_only_for_structured_methods():
    assert hf_sparse.SparsityPattern.parse("structured").is_structured
    with pytest.raises(ValueError, match="does not support pattern 'structured'"):
        hf_sparse.SparsityConfig(method="wanda", pattern="structured", sparsity=0.3)
    with pytest.raises(ValueError, match="does not support pattern 'unstructured'"):
        hf_sparse.SparsityConfig(method="flap", sparsity=0.3)
    with pytest.raises(ValueError, match="unknown option"):
        hf_sparse.SparsityConfig(method="sleb", pattern="structured", method_options={"barrier": 1})


def test_unsupported_structure_raises_before_weights_load(tmp_path):
    build("phi3").save_pretrained(tmp_path)
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=2, sequence_length=16)
    with pytest.raises(ValueError, match="architecture 'phi3' does not support structured pruning of attention_heads"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=cfg)


# ---------------------------------------------------------------------------------------------------------------
# Methods on tiny models


def _calibration(n=4, seq=32, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _config(method, sparsity, **kw):
    return hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity, calibration=_calibration(),
                                    num_samples=4, sequence_length=32, batch_size=2, **kw)


def test_structured_methods_run_in_the_engines_structured_pipeline():
    from hf_sparse.engine import PIPELINES, LayerwiseEngine, StructuredPipeline, infer_pipeline
    from hf_sparse.masks import SparsityPattern
    from hf_sparse.methods import build_method

    for name in ("flap", "shortgpt", "sleb", "pip"):
        assert infer_pipeline(build_method(name), parallel=True) is PIPELINES["structured"] is StructuredPipeline
    assert not infer_pipeline(build_method("wanda"), parallel=False).edits_structure
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    twin = copy.deepcopy(model)
    engine = LayerwiseEngine(build_method("shortgpt"), SparsityPattern.parse("structured"), 0.25, show_progress=False)
    result = engine.run(model, _calibration(), batch_size=2)
    assert result.counts == {} and len(result.structure["removed_blocks"]) == 1
    record = hf_sparse.prune(twin, _config("shortgpt", 0.25), show_progress=False)  # the same path from prune()
    assert record.structure == result.structure
    assert torch.equal(_logits(model), _logits(twin))
    with pytest.raises(ValueError, match="one fraction of the block parameters"):
        LayerwiseEngine(build_method("flap"), SparsityPattern.parse("structured"), {"a": 0.3},
                        show_progress=False).run(model, _calibration())


def test_shortgpt_block_influence_matches_hidden_states():
    from hf_sparse.methods.shortgpt import block_influence
    from hf_sparse.engine.structured import StructuredSession

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = _calibration()
    influence = block_influence(StructuredSession(model, ids, batch_size=2, show_progress=False))
    with torch.no_grad():
        hidden = list(model(ids, output_hidden_states=True).hidden_states)
    last_output = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: last_output.append(out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    hidden[-1] = last_output[0][0] if isinstance(last_output[0], tuple) else last_output[0]  # before the final norm
    expected = [(1 - torch.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)).mean().item() for i in range(4)]
    assert influence == pytest.approx(expected, rel=1e-5)
    record = hf_sparse.prune(model, _config("shortgpt", 0.25), show_progress=False)
    assert record.structure["removed_blocks"] == [min(range(4), key=lambda i: expected[i])]


def test_sleb_removes_the_block_whose_removal_costs_least():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = _calibration()

    def nll_without(index):
        pruned = copy.deepcopy(model)
        apply_and_describe(get_architecture(pruned), pruned, StructuredEdits(removed_blocks=(index,)))
        with torch.no_grad():
            return pruned(ids, labels=ids).loss.item()

    expected = min(range(1, 4), key=nll_without)  # the first and last blocks are protected by default
    record = hf_sparse.prune(model, _config("sleb", 0.2), show_progress=False)
    assert record.structure["removed_blocks"] == [expected]


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_flap_meets_the_parameter_budget_and_records_it_exactly(sparsity):
    model = build("llama")
    adapter = get_architecture(model)
    before = block_parameters(adapter, model)
    record = hf_sparse.prune(model, _config("flap", sparsity), show_progress=False)
    after = block_parameters(adapter, model)
    assert record.overall_sparsity == 1 - after / before
    assert record.structure["block_parameters"] == after
    largest_unit = max(unit_parameters(adapter, b) ["kv_group"] for b in adapter.blocks(model))
    assert abs((before - after) - sparsity * before) <= largest_unit
    for entry in record.structure["blocks"]:
        assert entry["kv_heads"] >= 1 and entry["mlp_channels"] >= 1
    assert torch.isfinite(_logits(model)).all()


def test_flap_channel_multiple_rounds_every_blocks_width_and_keeps_its_order():
    exact, rounded = build("llama"), build("llama")
    plain = hf_sparse.prune(exact, _config("flap", 0.3), show_progress=False).structure
    record = hf_sparse.prune(rounded, _config("flap", 0.3, method_options={"channel_multiple": 16}),
                             show_progress=False).structure
    original = record["original"]["mlp_channels"]
    for before, after in zip(plain["blocks"], record["blocks"]):
        assert after["mlp_channels"] % 16 == 0 or after["mlp_channels"] == original
        assert abs(after["mlp_channels"] - before["mlp_channels"]) <= 8  # nearest multiple
        assert after["kv_heads"] == before["kv_heads"]  # heads untouched
    with pytest.raises(ValueError, match="channel_multiple"):
        _config("flap", 0.3, method_options={"channel_multiple": 0})


def test_flap_bias_compensation_keeps_the_mean_output():
    """The new bias makes the pruned o_proj/down_proj give, on the dense model's mean input, exactly the dense mean
    output: W[:, kept] · mean[kept] + b = W · mean."""
    from hf_sparse.methods import build_method
    from hf_sparse.engine.structured import StructuredSession

    model = build("llama")
    ids = _calibration()
    edits = build_method("flap").plan_edits(StructuredSession(model, ids, batch_size=2, show_progress=False), 0.3)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_hook(lambda m, a, out, name=name: inputs.setdefault(name, []).append(a[0]))
               for name, module in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        for batch in ids.split(2):
            model(batch)
    for handle in handles:
        handle.remove()
    checked = 0
    for index, edit in edits.blocks.items():
        block = model.model.layers[index]
        for rel, kept in (("mlp.down_proj", edit.mlp and list(edit.mlp.kept_channels)),
                          ("self_attn.o_proj", edit.attention and torch.cat(
                              [torch.arange(h * 16, (h + 1) * 16) for h in edit.attention.kept_query_heads]).tolist())):
            if not kept:
                continue
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[f"model.layers.{index}.{rel}"]]).double()
            mean, weight = x.mean(0), _submodule(block, rel).weight.double()
            compensated = weight[:, kept] @ mean[kept] + edit.new_biases[rel].double()
            torch.testing.assert_close(compensated, weight @ mean, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 2


def test_lora_and_recover_on_a_structured_model():
    from peft import LoraConfig

    from hf_sparse.recovery import recover

    model = build("llama")
    hf_sparse.prune(model, _config("flap", 0.3), show_progress=False)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    peft_model = hf_sparse.peft.get_sparse_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    result = recover(peft_model.merge_and_unload(), None, _calibration(8, 16), objective="lm", steps=2, batch_size=2,
                     sequence_length=16, rank=2, show_progress=False)
    assert {n: p.shape for n, p in result.model.named_parameters()} == shapes
    assert hf_sparse.read_record(result.model).recovery["steps"] == 2


# ---------------------------------------------------------------------------------------------------------------
# The real 7M model (short)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flap", "shortgpt"])
def test_real_model_prunes_saves_and_reloads(method, model_dir, tmp_path):
    from conftest import CALIBRATION_TXT, TEST_TXT

    cfg = hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=0.3, calibration=str(CALIBRATION_TXT),
                                   num_samples=8, sequence_length=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, sparsity_config=cfg)
    record = hf_sparse.read_record(model)
    assert abs(record.overall_sparsity - 0.3) < 0.04
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = TEST_TXT.read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : 4 * 256].reshape(4, 256)
    with torch.no_grad():
        pruned_loss = model(ids, labels=ids).loss.item()
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        dense_loss = dense(ids, labels=ids).loss.item()
    assert dense_loss < pruned_loss < dense_loss + 1.5  # worse than dense, far from broken
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded, ids[:1]), _logits(model, ids[:1]))
