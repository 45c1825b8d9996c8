"""GGUF export: tiny files written and read back with gguf.GGUFReader (architecture, per-layer arrays, tensors, the
tokenizer, the record), llama-architecture files loaded by transformers' own GGUF reader (same logits as the source),
quantized types, the CLI, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import hf_sparse
from conftest import DEMO_MODEL, tiny_llama
from hf_sparse.architectures import get_architecture
from hf_sparse.cli import main
from hf_sparse.export import plan_export
from hf_sparse.export.gguf import RECORD_KEY
from hf_sparse.surgery import BlockEdit, StructuredEdits, apply_edits
from hf_sparse.surgery.edits import ResidualEdit

gguf = pytest.importorskip("gguf")

CALIBRATION = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)


def _tiny(**overrides):
    return tiny_llama(vocab_size=4096, num_hidden_layers=3, **overrides)


def _prune(model, method, sparsity=0.3, **options):
    config = hf_sparse.SparsityConfig(method=method, pattern="structured" if method in ("flap", "pip", "shortgpt")
                                      else options.pop("pattern"), sparsity=sparsity, calibration=CALIBRATION,
                                      num_samples=8, sequence_length=32, batch_size=4, method_options=options)
    return hf_sparse.prune(model, config, show_progress=False)


def _export(model, tokenizer, path, **kwargs):
    return hf_sparse.export_gguf(model, path, tokenizer=tokenizer, show_progress=False, **kwargs)


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def _tensor(reader, name) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    data = np.asarray(tensor.data)
    if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = gguf.quants.dequantize(data, tensor.tensor_type)
    return data.astype(np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def _gguf_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# -- what is written -------------------------------------------------------------------------------------------------

def test_dense_model_keeps_the_llama_architecture_and_the_tokenizer(tmp_path, tokenizer):
    model = _tiny()
    path = _export(model, tokenizer, tmp_path / "dense.gguf")
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.feed_forward_length"], fields["llama.attention.key_length"]) == (3, 4, 2, 128, 16)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 4096 and all(tokens[i] == t for t, i in vocab.items())
    assert len(fields["tokenizer.ggml.merges"]) > 3000
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and types[3] == int(gguf.TokenType.NORMAL)
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.bos_token_id"] == 1
    assert RECORD_KEY not in fields  # nothing was done to it
    assert _tensor(reader, "blk.0.ffn_down.weight").shape == (64, 128)
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "output_norm.weight"}


def test_llama_files_load_in_transformers_with_the_source_logits(tmp_path, tokenizer):
    model = _tiny()
    path = _export(model, tokenizer, tmp_path / "dense.gguf")
    assert torch.allclose(_gguf_logits(path), _logits(model), atol=1e-5)


def test_query_and_key_rows_are_interleaved_for_llamacpp_rotary(tmp_path, tokenizer):
    model = _tiny()
    reader, _ = _fields(_export(model, tokenizer, tmp_path / "dense.gguf"))
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # (4 heads * 16, 64)
    written = _tensor(reader, "blk.1.attn_q.weight")
    # within a head, row 2i is the source's row i and row 2i+1 the source's row i + 8
    assert np.array_equal(written[0], q[0]) and np.array_equal(written[1], q[8]) and np.array_equal(written[2], q[1])
    assert np.array_equal(written[16 + 1], q[16 + 8])


def test_unstructured_and_2of4_zeros_stay_zeros(tmp_path, tokenizer):
    model = _tiny()
    _prune(model, "magnitude", 0.5, pattern="2:4")
    for outtype in ("f32", "f16", "q8_0"):
        reader, fields = _fields(_export(model, tokenizer, tmp_path / f"m-{outtype}.gguf", outtype=outtype))
        up = _tensor(reader, "blk.0.ffn_up.weight")
        source = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
        assert np.array_equal(up == 0, source == 0), outtype
        assert json.loads(fields[RECORD_KEY])["pattern"] == "2:4"
    assert torch.allclose(_gguf_logits(tmp_path / "m-f32.gguf"), _logits(model), atol=1e-5)


def test_uniform_structured_model_keeps_the_llama_architecture(tmp_path, tokenizer):
    model = _tiny()
    record = _prune(model, "pip", 0.3, uniform_shapes=True)
    path = _export(model, tokenizer, tmp_path / "uniform.gguf")
    _, fields = _fields(path)
    block = record.structure["blocks"][0]
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.feed_forward_length"]) == (block["attention_heads"], block["kv_heads"], block["mlp_channels"])
    assert json.loads(fields[RECORD_KEY])["method_options"]["uniform_shapes"] is True
    assert torch.allclose(_gguf_logits(path), _logits(model), atol=1e-5)


def test_uniform_flap_biases_go_to_llama_slots_and_zero_biases_are_not_written(tmp_path, tokenizer):
    model = _tiny()
    _prune(model, "flap", 0.3, uniform_shapes=True)
    assert model.config.mlp_bias and model.model.layers[0].mlp.gate_proj.bias is not None  # zero, for the config
    reader, fields = _fields(_export(model, tokenizer, tmp_path / "uniform-flap.gguf"))
    names = {t.name for t in reader.tensors}
    assert fields["general.architecture"] == "llama"
    assert "blk.0.ffn_down.bias" in names and "blk.0.ffn_gate.bias" not in names and "blk.0.ffn_up.bias" not in names
    assert np.allclose(_tensor(reader, "blk.0.ffn_down.bias"), model.model.layers[0].mlp.down_proj.bias.detach())


def test_layer_removal_writes_fewer_llama_layers(tmp_path, tokenizer):
    model = _tiny()
    _prune(model, "shortgpt", 0.34)
    path = _export(model, tokenizer, tmp_path / "short.gguf")
    _, fields = _fields(path)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert torch.allclose(_gguf_logits(path), _logits(model), atol=1e-5)


def test_per_block_widths_become_deci_with_per_layer_arrays_and_biases(tmp_path, tokenizer):
    model = _tiny()
    record = _prune(model, "flap", 0.3)
    blocks = record.structure["blocks"]
    assert len({(b["kv_heads"], b["mlp_channels"]) for b in blocks}) > 1  # the blocks differ
    reader, fields = _fields(_export(model, tokenizer, tmp_path / "flap.gguf"))
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [b["attention_heads"] for b in blocks]
    assert fields["deci.attention.head_count_kv"] == [b["kv_heads"] for b in blocks]
    assert fields["deci.feed_forward_length"] == [b["mlp_channels"] for b in blocks]
    assert json.loads(fields[RECORD_KEY]) == json.loads(json.dumps(record.to_dict()))
    for index, block in enumerate(blocks):
        assert _tensor(reader, f"blk.{index}.ffn_down.weight").shape == (64, block["mlp_channels"])
        for name in block.get("new_biases", ()):
            target = {"self_attn.o_proj": "attn_output.bias", "mlp.down_proj": "ffn_down.bias"}[name]
            source = model.model.layers[index].get_submodule(name).bias.detach().numpy()
            assert np.allclose(_tensor(reader, f"blk.{index}.{target}"), source)


def test_outtypes_and_q8_0_fallback_for_rows_not_a_multiple_of_32(tmp_path, tokenizer):
    model = _tiny()
    _prune(model, "flap", 0.3, bias_compensation=False)
    widths = [block.mlp.down_proj.in_features for block in model.model.layers]
    reader, fields = _fields(_export(model, tokenizer, tmp_path / "q8.gguf", outtype="q8_0"))
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64 inputs
    for index, width in enumerate(widths):
        expected = gguf.GGMLQuantizationType.Q8_0 if width % 32 == 0 else gguf.GGMLQuantizationType.F16
        assert types[f"blk.{index}.ffn_down.weight"] == expected
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    reader, fields = _fields(_export(model, tokenizer, tmp_path / "bf16.gguf", outtype="bf16"))
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.BF16}
    down = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.allclose(_tensor(reader, "blk.0.ffn_down.weight"), down, atol=1e-2)


def test_qwen2_keeps_its_architecture_dense_and_goes_to_deci_when_heads_change(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases start at zero, and an all-zero bias is not written
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    plan = plan_export(model)
    assert plan.arch == "qwen2" and "blk.0.attn_q.bias" in plan.tensors
    reader, _ = _fields(_export(model, tokenizer, tmp_path / "q.gguf"))
    # qwen2 applies rotary embeddings to halves, as transformers does: no reordering
    assert np.array_equal(_tensor(reader, "blk.0.attn_q.weight"), model.model.layers[0].self_attn.q_proj.weight
                          .detach().numpy())
    from hf_sparse.surgery import AttentionEdit

    edit = {i: BlockEdit(attention=AttentionEdit.whole_groups([1], 2)) for i in range(2)}  # one group in each block
    apply_edits(model, get_architecture(model), StructuredEdits(blocks=edit))
    plan = plan_export(model)  # one shape, but qwen2's attention is hidden-size wide: deci
    assert plan.arch == "deci" and plan.layers[0].heads == 2


def test_export_from_a_saved_folder_and_the_cli(tmp_path, capsys):
    from conftest import save_tiny_with_demo_tokenizer

    folder = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    assert main(["export", str(folder), str(tmp_path / "tiny.gguf"), "--outtype", "f16", "-q"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "f16" in out
    _, fields = _fields(tmp_path / "tiny.gguf")
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert main(["export", str(folder), str(tmp_path / "tiny.gguf"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(folder), str(tmp_path / "tiny.gguf"), "--overwrite", "-q"]) == 0
    assert not list(tmp_path.glob(".tiny.gguf.tmp-*"))  # no temporary file left


def test_chat_template_is_written(tmp_path, tokenizer):
    chat = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, fields = _fields(_export(_tiny(), chat, tmp_path / "chat.gguf"))
    assert fields["tokenizer.chat_template"] == chat.chat_template


# -- refusals (one line each, before anything is written) ------------------------------------------------------------

def _refused(tmp_path, model, tokenizer, match, name="out.gguf", **kwargs):
    existed = (tmp_path / name).exists()
    with pytest.raises(ValueError, match=match) as error:
        _export(model, tokenizer, tmp_path / name, **kwargs)
    assert "\n" not in str(error.value)
    assert (tmp_path / name).exists() == existed
    assert not list(tmp_path.glob(f".{name}.tmp-*"))


def test_existing_output_is_refused_unless_overwrite(tmp_path, tokenizer):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    _refused(tmp_path, _tiny(), tokenizer, r"exists\.gguf' already exists; choose a new file or pass overwrite=True",
             name="exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    _export(_tiny(), tokenizer, tmp_path / "exists.gguf", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "exists.gguf").fields["general.architecture"].contents() == "llama"


def test_unwritable_paths_are_refused(tmp_path, tokenizer):
    (tmp_path / "a-file").write_text("x")
    _refused(tmp_path, _tiny(), tokenizer, "its folder does not exist", name="a-file/out.gguf")
    _refused(tmp_path, _tiny(), tokenizer, "its folder does not exist", name="missing/out.gguf")
    (tmp_path / "folder.gguf").mkdir()
    _refused(tmp_path, _tiny(), tokenizer, "is a folder; name a .gguf file", name="folder.gguf")


def test_bad_outtype_is_refused(tmp_path, tokenizer):
    _refused(tmp_path, _tiny(), tokenizer, r"outtype 'q4_k' is not supported; use one of \['f32', 'f16', 'bf16'",
             outtype="q4_k")


def test_a_family_without_mapping_is_refused(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)).eval()
    _refused(tmp_path, model, tokenizer, r"model_type 'gpt_neox' has no GGUF mapping in hf_sparse; export_gguf writes")


def test_residual_selections_are_refused(tmp_path, tokenizer):
    model = _tiny()
    edit = BlockEdit(residual=ResidualEdit(attention_input=tuple(range(32))))
    apply_edits(model, get_architecture(model), StructuredEdits(blocks={1: edit}))
    _refused(tmp_path, model, tokenizer, r"block 1 reads and writes its own residual dimensions \(DISP-LLM\)")


def test_a_bias_without_a_slot_is_refused(tmp_path, tokenizer):
    model = _tiny()
    model.lm_head.bias = nn.Parameter(torch.zeros(4096))
    _refused(tmp_path, model, tokenizer, r"bias 'lm_head.bias' has no slot in GGUF architecture 'llama'")


def test_unknown_rope_scaling_is_refused(tmp_path, tokenizer):
    model = _tiny()
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    _refused(tmp_path, model, tokenizer, r"rope scaling 'yarn' has no GGUF mapping in hf_sparse")


def test_mistral_sliding_window_is_refused(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=16)).eval()
    _refused(tmp_path, model, tokenizer, r"mistral with sliding_window=16 below its context 128")
    model.config.sliding_window = None
    assert plan_export(model).arch == "llama"


def test_tokenizers_the_helpers_do_not_know_are_refused(tmp_path, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    _refused(tmp_path, _tiny(), word_level, r"tokenizer model 'WordLevel' .* is not one the gguf vocabulary helpers")
    odd = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    _refused(tmp_path, _tiny(), odd, r"pre-tokenizer .* has no llama.cpp name known to hf_sparse")
    _refused(tmp_path, tiny_llama(vocab_size=1000), tokenizer, r"the tokenizer has 4096 tokens but the model's "
                                                               r"embedding only 1000 rows")


def test_input_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is not a checkpoint folder \(no config.json\)"):
        hf_sparse.export_gguf(tmp_path, tmp_path / "out.gguf")


def test_a_compact_checkpoint_exports_with_its_zeros(tmp_path, tokenizer):
    from hf_sparse.formats import compress_checkpoint

    model = _tiny()
    _prune(model, "magnitude", 0.5, pattern="2:4")
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    compress_checkpoint(tmp_path / "pruned", tmp_path / "compact")
    tokenizer.save_pretrained(tmp_path / "compact")
    reader, fields = _fields(hf_sparse.export_gguf(tmp_path / "compact", tmp_path / "c.gguf", show_progress=False))
    assert json.loads(fields[RECORD_KEY])["pattern"] == "2:4"
    assert np.array_equal(_tensor(reader, "blk.2.ffn_gate.weight"), model.model.layers[2].mlp.gate_proj.weight
                          .detach().numpy())


def test_sigterm_mid_export_leaves_no_partial_file(tmp_path, tokenizer, monkeypatch):
    """A SIGTERM while the tensors are written: the temporary file is removed, the destination never appears, and the
    process still stops (here the test's own handler receives the signal again, then SystemExit 128 + 15)."""
    import os
    import signal

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file",
                            lambda self, *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit) as stopped:
            _export(_tiny(), tokenizer, tmp_path / "out.gguf")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM and received == [signal.SIGTERM]
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf.tmp-*"))
