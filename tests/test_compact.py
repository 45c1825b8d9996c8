"""Compact checkpoints: exact encodings (N:M, bitmask), the per-tensor choice, and the transformers round trip.

Tiny Llamas keep these fast; the slow tests check the shared 7M model's sizes against the ideal and its bit-identical
reload.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import hf_sparse
from conftest import MODEL_DIR, load_pretrained, run_without_hf_sparse, tiny_llama
from hf_sparse.formats import (
    checkpoint_bytes, choose_encoding, compress_checkpoint, compress_state_dict, compress_weight,
    decompress_checkpoint, decompress_state_dict, decompress_weight,
)
from hf_sparse.formats.bitmask import decode_bitmask, encode_bitmask
from hf_sparse.formats.bits import bit_view, is_kept
from hf_sparse.formats.checkpoint import weight_files
from hf_sparse.formats.guard import strip_guard
from hf_sparse.formats.n_m import decode_n_m, encode_n_m, fits_n_m
from hf_sparse.masks import select_n_m, select_unstructured

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def _pruned(rows: int, cols: int, pattern: str, sparsity: float = 0.5, dtype=torch.float16, seed: int = 0):
    """A random weight with the pattern's zeros applied by multiplication (so half the zeros are -0.0)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = select_n_m(weight.abs(), 2, 4) if pattern == "2:4" else select_unstructured(weight.abs(), sparsity)
    return (weight * mask).to(dtype)


def _same_bits_up_to_zero_sign(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that a zero of either sign equals a zero of the other."""
    kept = is_kept(a)
    return torch.equal(kept, is_kept(b)) and torch.equal(bit_view(a)[kept], bit_view(b)[kept])


# --- exact small cases -------------------------------------------------------------------------------------------

def test_n_m_positions_are_two_bits_per_kept_value_msb_first():
    weight = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 2.0, 0.0]])
    values, positions = encode_n_m(weight, 2, 4)
    assert values.tolist() == [[5.0, 7.0, 1.0, 2.0]]
    # group 0 keeps 1, 3 -> 01 11; group 1 keeps 0, 2 -> 00 10: one byte 0111_0010
    assert positions.tolist() == [[0b01110010]]
    assert torch.equal(decode_n_m(values, positions, 8, 2, 4), weight)


def test_n_m_group_with_fewer_kept_values_stores_zeros_at_its_lowest_free_positions():
    weight = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    values, positions = encode_n_m(weight, 2, 4)
    assert values.tolist() == [[0.0, 3.0]] and positions.tolist() == [[0b00100000]]  # positions 0, 2
    assert torch.equal(decode_n_m(values, positions, 4, 2, 4), weight)


def test_bitmask_is_row_aligned_and_values_row_major():
    weight = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0], [1.0] + [0.0] * 8])
    values, bitmask = encode_bitmask(weight)
    assert values.tolist() == [2.0, 3.0, 4.0, 1.0]
    assert bitmask.tolist() == [[0b01010000, 0b10000000], [0b10000000, 0]]
    assert torch.equal(decode_bitmask(values, bitmask, 9), weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_round_trip_restores_every_non_zero_bit_for_bit(dtype, pattern):
    weight = _pruned(24, 64, pattern, dtype=dtype, seed=1)
    parts = compress_weight(weight, pattern if pattern == "2:4" else None)
    assert "weight_layout" in parts
    back = decompress_weight(parts)
    assert back.dtype == dtype and back.shape == weight.shape
    assert _same_bits_up_to_zero_sign(back, weight)
    assert torch.equal(back.float(), weight.float())  # -0.0 == 0.0: equal as values everywhere


def test_nan_payloads_and_negative_values_survive():
    weight = torch.zeros(4, 8)
    weight.view(torch.int32)[0, 1] = 0x7FC00123  # a NaN with a payload
    weight[1, 2], weight[2, 5] = -3.5, float("-inf")
    back = decompress_weight(compress_weight(weight))
    assert torch.equal(bit_view(back), bit_view(weight))


def test_negative_zero_counts_as_pruned():
    weight = torch.tensor([[-0.0, 1.0, -0.0, 2.0]] * 8, dtype=torch.float16)
    assert fits_n_m(weight, 2, 4) and choose_encoding(weight, "2:4")[0] == "n:m"
    assert decompress_weight(compress_weight(weight, "2:4"))[0, 0].item() == 0.0


# --- the per-tensor choice and its sizes --------------------------------------------------------------------------

def _ratio(weight: torch.Tensor, pattern=None) -> float:
    parts = compress_weight(weight, pattern)
    stored = sum(t.numel() * t.element_size() for name, t in parts.items() if name != "weight_layout")
    return stored / (weight.numel() * weight.element_size())


def test_sizes_are_the_ideal_fractions_of_fp16():
    assert _ratio(_pruned(64, 128, "2:4"), "2:4") == 0.5625
    assert _ratio(_pruned(64, 128, "unstructured", 0.5)) == 0.5625
    assert _ratio(_pruned(64, 128, "unstructured", 0.7)) == pytest.approx(0.3625, abs=1 / (64 * 128))


def test_choice_is_the_smallest_form():
    dense_ish = _pruned(16, 64, "unstructured", 0.05)  # fp16: a bitmask pays off above 1/16 sparsity
    assert choose_encoding(dense_ish)[0] == "dense" and compress_weight(dense_ish).keys() == {"weight"}
    sparse = _pruned(16, 64, "unstructured", 0.7)
    assert choose_encoding(sparse, "2:4")[0] == "bitmask"  # does not fit 2:4
    one_of_four = torch.tensor([[0.0, 0.0, 1.0, 0.0] * 4] * 8)
    assert choose_encoding(one_of_four, "1:4")[0] == "n:m"  # 2 bits per 4 weights beat 4 bits of bitmask
    four_of_eight = torch.tensor([[1.0, 0.0] * 8] * 8)
    assert choose_encoding(four_of_eight, "4:8")[0] == "bitmask"  # 12 bits per 8 weights lose to 8


def test_state_dict_round_trip_and_only_listed_modules_compress():
    state = {"a.weight": _pruned(8, 16, "2:4"), "a.bias": torch.ones(8), "b.weight": _pruned(8, 16, "2:4")}
    compact, summary = compress_state_dict(state, {"a": "2:4"})
    assert set(compact) == {"a.weight", "a.weight_positions", "a.weight_layout", "a.bias", "b.weight"}
    assert summary.encodings == {"a": "n:m"} and summary.stored_bytes < summary.dense_bytes
    back = decompress_state_dict(compact)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_corrupt_entries_are_refused():
    parts = compress_weight(_pruned(8, 16, "2:4"), "2:4")
    with pytest.raises(ValueError, match="weight_positions"):
        decompress_weight({"weight": parts["weight"], "weight_layout": parts["weight_layout"]})
    values, bitmask = encode_bitmask(_pruned(8, 16, "unstructured"))
    with pytest.raises(ValueError, match="values are stored"):
        decode_bitmask(torch.cat([values, values[:1]]), bitmask, 16)


# --- transformers: save_pretrained(compressed=True) and from_pretrained ------------------------------------------

def _pruned_tiny(pattern: str, sparsity: float = 0.5, dtype=torch.float32):
    model = tiny_llama(seed=0)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=sparsity),
                    show_progress=False)
    return model.to(dtype)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit for bit: hf_sparse writes pruned weights as +0.0 (masked_fill), which is what a compact checkpoint restores."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(bit_view(sa[name]), bit_view(sb[name])), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2:4 tiny Llama in fp16, saved dense, compressed, and compressed in several shards."""
    model = _pruned_tiny("2:4", dtype=torch.float16)
    root = tmp_path_factory.mktemp("compact")
    model.save_pretrained(root / "dense")
    model.save_pretrained(root / "compact", compressed=True)
    model.save_pretrained(root / "sharded", compressed=True, max_shard_size="20KB")
    return model, root


def test_compressed_checkpoint_is_smaller_and_marked(saved):
    model, root = saved
    config = json.loads((root / "compact" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "hf_sparse_compact", "format_version": 1}
    storage = config["sparsity_config"]["storage"]
    assert storage["format"] == "hf_sparse_compact" and storage["version"] == 1 and storage["encodings"] == {"n:m": 14}
    assert checkpoint_bytes(root / "compact") < checkpoint_bytes(root / "dense")
    # the model in memory is unchanged by saving
    assert "quantization_config" not in vars(model.config) and "storage" not in model.config.sparsity_config


@pytest.mark.parametrize("folder", ["compact", "sharded"])
def test_reload_is_bit_identical_and_a_plain_model(saved, folder):
    model, root = saved
    files, index = weight_files(root / folder)
    assert (len(files) > 1) == (folder == "sharded") and (index is not None) == (folder == "sharded")
    loaded = AutoModelForCausalLM.from_pretrained(root / folder)
    _assert_same_weights(model, loaded)
    # Against the dense checkpoint loaded the same way (model.half() in memory also casts the rotary buffers).
    dense = AutoModelForCausalLM.from_pretrained(root / "dense")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)
    assert not hasattr(loaded, "hf_quantizer") and getattr(loaded, "is_quantized", False) is False
    assert "quantization_config" not in vars(loaded.config) and "storage" not in loaded.config.sparsity_config
    masks, expected = hf_sparse.get_masks(loaded), hf_sparse.get_masks(model)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)


def test_reload_with_a_device_map_and_another_dtype(saved):
    model, root = saved
    loaded = AutoModelForCausalLM.from_pretrained(root / "sharded", device_map="cpu", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_unstructured_70_percent_round_trip(tmp_path):
    model = _pruned_tiny("unstructured", 0.7, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "c", compressed=True)
    storage = json.loads((tmp_path / "c" / "config.json").read_text())["sparsity_config"]["storage"]
    assert storage["encodings"] == {"bitmask": 14}
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "c"))


def test_saving_again_after_reload_writes_dense_unless_asked(saved, tmp_path):
    _, root = saved
    loaded = AutoModelForCausalLM.from_pretrained(root / "compact")
    loaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "quantization_config" not in config and "storage" not in config["sparsity_config"]


def test_compressed_needs_a_pruned_model(tmp_path):
    with pytest.raises(ValueError, match="no 'sparsity_config' record"):
        tiny_llama().save_pretrained(tmp_path / "x", compressed=True)


def test_compressed_refuses_structured_models_it_would_make_unloadable(tmp_path):
    model = tiny_llama(seed=0)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="shortgpt", pattern="structured", sparsity=0.5,
                                                    calibration=torch.randint(0, 128, (2, 16)), num_samples=2,
                                                    sequence_length=16), show_progress=False)
    with pytest.raises(ValueError, match="lists none"):
        model.save_pretrained(tmp_path / "x", compressed=True)
    model.config.quantization_config = {"quant_method": "hf_sparse_structured"}  # blocks of different shapes
    with pytest.raises(ValueError, match="hf_sparse_structured"):
        model.save_pretrained(tmp_path / "x", compressed=True)
    assert not (tmp_path / "x").exists()


def test_peft_recovery_on_a_compressed_checkpoint_keeps_the_mask(saved):
    from peft import LoraConfig

    model, root = saved
    loaded = AutoModelForCausalLM.from_pretrained(root / "compact", dtype=torch.float32)
    peft_model = hf_sparse.peft.get_sparse_peft_model(loaded, LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                                         init_lora_weights=False))
    merged = peft_model.merge_and_unload()
    masks, expected = hf_sparse.get_masks(merged), hf_sparse.get_masks(model)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)


_PLAIN_LOAD = """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kwargs = {"": {}, "forced": dict(dtype=torch.float32, ignore_mismatched_sizes=True, id2label=None)}[sys.argv[2]]
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
    except Exception as error:
        print(type(error).__name__ + ": " + " ".join(str(error).split()))
    else:
        print("LOADED")
"""


@pytest.mark.parametrize("kwargs", ["", "forced"])
def test_plain_transformers_refuses_a_compressed_checkpoint_naming_hf_sparse(saved, kwargs):
    """No keyword gets past the model type: not a dtype, not ignore_mismatched_sizes (which would re-initialise the
    mismatching weights at random), not an id2label of the caller's."""
    _, root = saved
    for folder in ("compact", "sharded"):
        done = run_without_hf_sparse(_PLAIN_LOAD, str(root / folder), kwargs)
        assert done.returncode == 0, done.stderr
        message = done.stdout.strip().splitlines()[-1]
        assert message.startswith("ValueError: ") and "does not recognize this architecture" in message
        assert "model type `hf_sparse_compact`" in message


def test_the_guard_is_only_in_the_file(saved, tmp_path):
    """config.json has hf_sparse's model type; with hf_sparse the config read back has the architecture's, and so do
    the loaded model and a checkpoint saved from it."""
    model, root = saved
    stored = json.loads((root / "compact" / "config.json").read_text())
    assert stored["model_type"] == "hf_sparse_compact" and stored["hf_sparse_original_model_type"] == "llama"
    config = AutoConfig.from_pretrained(root / "compact")
    assert config.model_type == "llama" and config.quantization_config["quant_method"] == "hf_sparse_compact"
    loaded = AutoModelForCausalLM.from_pretrained(root / "compact")
    assert loaded.config.model_type == "llama" and loaded.config.id2label == model.config.id2label
    loaded.save_pretrained(tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "llama"
    assert model.config.model_type == "llama"  # saving compact left the model's config as it was


def test_guard_round_trips_and_refuses_a_missing_original_type():
    from hf_sparse.formats.guard import ORIGINAL_TYPE_KEY, add_guard
    from hf_sparse.surgery import STRUCTURED_QUANT_METHOD

    labelled = {"model_type": "llama", "quantization_config": {"quant_method": STRUCTURED_QUANT_METHOD},
                "id2label": {"0": "neg", "1": "pos"}}
    guarded = add_guard(labelled)
    assert guarded["model_type"] == STRUCTURED_QUANT_METHOD and guarded[ORIGINAL_TYPE_KEY] == "llama"
    assert add_guard(guarded) == guarded and strip_guard(guarded) == labelled and guarded["id2label"] == {"0": "neg",
                                                                                                        "1": "pos"}
    assert add_guard({"model_type": "llama"}) == {"model_type": "llama"}  # no hf_sparse marker: nothing added
    with pytest.raises(ValueError, match="hf_sparse_original_model_type is None"):
        strip_guard({"model_type": "hf_sparse_compact"})
    with pytest.raises(ValueError, match="config has no model_type"):
        add_guard({"quantization_config": {"quant_method": "hf_sparse_compact"}})


def test_config_hook_is_what_reads_the_guard_and_uninstalls_exactly(saved):
    from transformers import PreTrainedConfig

    from hf_sparse.integrations import loading_guard

    _, root = saved
    original = loading_guard._ORIGINAL_GET_CONFIG_DICT
    loading_guard.install_config_hook()  # idempotent
    try:
        loading_guard.uninstall_config_hook()
        assert not loading_guard.is_config_hook_installed()
        assert PreTrainedConfig.__dict__["get_config_dict"] is original
        assert PreTrainedConfig.get_config_dict(root / "compact")[0]["model_type"] == "hf_sparse_compact"
        # The model type stays registered with AutoConfig, which builds the architecture's config from it.
        assert AutoConfig.from_pretrained(root / "compact").model_type == "llama"
    finally:
        loading_guard.install_config_hook()
    assert loading_guard.is_config_hook_installed()
    assert PreTrainedConfig.get_config_dict(root / "compact")[0]["model_type"] == "llama"
    assert AutoConfig.from_pretrained(root / "compact").quantization_config["quant_method"] == "hf_sparse_compact"


def test_without_the_guard_plain_transformers_still_refuses_on_the_shapes(saved, tmp_path):
    """A config.json whose guard was removed by hand: the stored values do not fit the layers, so the load stops."""
    _, root = saved
    shutil.copytree(root / "compact", tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps(strip_guard(config)))
    done = run_without_hf_sparse(_PLAIN_LOAD, str(tmp_path / "edited"), "")
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith("RuntimeError: ") and "ignore_mismatched_sizes" in message


# --- checkpoint folders -------------------------------------------------------------------------------------------

def _tensors(folder) -> dict[str, torch.Tensor]:
    files, _ = weight_files(folder)
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as reader:
            out.update({key: reader.get_tensor(key) for key in reader.keys()})
    return out


def test_compress_checkpoint_matches_save_pretrained_and_decompress_inverts_it(saved, tmp_path):
    model, root = saved
    summary = compress_checkpoint(root / "dense", tmp_path / "c", show_progress=False)
    assert summary.encodings and summary.stored_bytes < summary.dense_bytes
    ours, theirs = _tensors(tmp_path / "c"), _tensors(root / "compact")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "c" / "generation_config.json").exists()
    keys = ("model_type", "hf_sparse_original_model_type")
    guards = [{key: json.loads((folder / "config.json").read_text())[key] for key in keys}
              for folder in (tmp_path / "c", root / "compact")]
    assert guards[0] == guards[1] == {"model_type": "hf_sparse_compact", "hf_sparse_original_model_type": "llama"}
    for source in ("compact", "sharded"):
        decompress_checkpoint(root / source, tmp_path / f"d-{source}", show_progress=False)
        config = json.loads((tmp_path / f"d-{source}" / "config.json").read_text())
        assert "quantization_config" not in config and "storage" not in config["sparsity_config"]
        assert config["model_type"] == "llama" and "hf_sparse_original_model_type" not in config  # loads anywhere
        dense = _tensors(tmp_path / f"d-{source}")
        expected = _tensors(root / "dense")
        assert dense.keys() == expected.keys()
        assert all(_same_bits_up_to_zero_sign(dense[k], expected[k]) for k in dense)


def test_checkpoint_tools_refuse_bad_inputs_and_existing_outputs(saved, tmp_path):
    _, root = saved
    with pytest.raises(ValueError, match="already in compact storage"):
        compress_checkpoint(root / "compact", tmp_path / "x")
    with pytest.raises(ValueError, match="not in compact storage"):
        decompress_checkpoint(root / "dense", tmp_path / "x")
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)
    with pytest.raises(ValueError, match="no 'sparsity_config'"):
        compress_checkpoint(plain, tmp_path / "x")
    shutil.copytree(root / "dense", tmp_path / "exists")  # only a checkpoint folder is ever replaced
    with pytest.raises(ValueError, match="already exists"):
        compress_checkpoint(root / "dense", tmp_path / "exists")
    compress_checkpoint(root / "dense", tmp_path / "exists", overwrite=True, show_progress=False)
    assert checkpoint_bytes(tmp_path / "exists") == checkpoint_bytes(root / "compact")
    assert not list(tmp_path.glob(".exists.*"))  # no temporary folder left behind


# --- the shared 7M model ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pattern,sparsity,ideal", [("2:4", 0.5, 0.5625), ("unstructured", 0.5, 0.5625),
                                                    ("unstructured", 0.7, 0.3625)])
def test_shared_model_reloads_bit_identically_within_one_percent_of_ideal(tmp_path, pattern, sparsity, ideal):
    model = load_pretrained()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=sparsity),
                    show_progress=False)
    model = model.half()
    model.save_pretrained(tmp_path / "c", compressed=True)
    stored = _tensors(tmp_path / "c")
    modules = model.config.sparsity_config["modules"]
    linear_dense = sum(dict(model.named_modules())[name].weight.numel() * 2 for name in modules)
    linear_stored = sum(t.numel() * t.element_size() for key, t in stored.items() if key.rpartition(".")[0] in modules)
    assert linear_stored / linear_dense == pytest.approx(ideal, rel=0.01)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    _assert_same_weights(model, loaded)
    assert MODEL_DIR.exists()


# --- load memory: the model plus one decompressed matrix --------------------------------------------------------

def _allocated_during(load, mapped_sizes: set[int]):
    """``(result, peak, end)``: bytes allocated through torch's CPU allocator while ``load()`` runs, at their highest
    and at the end. safetensors registers each memory-mapped file once as an allocation of the file's size: those
    are file pages, not allocations, and are left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = load()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if abs(event.nbytes()) in mapped_sizes:
            continue
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak, live


@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("unstructured", 0.7)])
def test_loading_holds_at_most_one_decompressed_matrix_above_the_model(tmp_path, monkeypatch, pattern, sparsity):
    """Counted allocation by allocation (torch's profiler), not sampled: the peak while loading a float16 compact
    checkpoint as float32 is the final model plus the largest matrix plus the decoder's chunk work tensors.

    Loading runs synchronously here (``HF_DEACTIVATE_ASYNC_LOAD``) so that every allocation, the reads included,
    happens on the profiled thread; the reader threads of the default path read the same zero-copy views
    (see the next test). Small decode chunks make the chunk term small next to the tiny model's matrices."""
    from hf_sparse.formats import bits

    model = tiny_llama(seed=0, hidden_size=64, intermediate_size=256)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern, sparsity=sparsity),
                    show_progress=False)
    model.half().save_pretrained(tmp_path / "c", compressed=True)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    chunk = 512
    monkeypatch.setattr(bits, "DECODE_CHUNK_ELEMENTS", chunk)
    loaded, peak, end = _allocated_during(
        lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32),
        {(tmp_path / "c" / "model.safetensors").stat().st_size},
    )
    tensors = [*loaded.parameters(), *loaded.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    largest = max(m.weight.numel() * 4 for m in loaded.modules() if isinstance(m, torch.nn.Linear))
    # Nothing is kept beyond the model (no cached entries, no second copy of a weight) ...
    assert end <= model_bytes
    # ... and on the way the extra is one dense float32 matrix plus per-chunk work tensors: int64 positions
    # (4 bytes per weight), masked_scatter's int64 prefix sums (8 bytes per weight), bits and a float16 scratch chunk.
    assert peak - model_bytes <= largest + 16 * chunk
    # The bound is not vacuous: decoding whole matrices at once (the old decoder) needed int64 positions of 4 bytes
    # per weight, twice a float16 matrix, on top of it.
    assert largest + 16 * chunk < 2 * largest


def test_compact_entries_are_read_as_stored_on_the_cpu():
    """The reader threads transformers runs ahead of the loader get no cast and no device for a compact weight's
    entries: they read zero-copy views of the mapped file, and only the decoder, one weight at a time, allocates."""
    from hf_sparse.integrations.compressed import CompactStorageConfig, CompactStorageQuantizer, DecompressCompactWeight

    quantizer = CompactStorageQuantizer(CompactStorageConfig(), pre_quantized=True)
    (converter,) = quantizer.get_weight_conversions()
    assert converter.force_cpu and isinstance(converter.operations[0], DecompressCompactWeight)
    values = torch.zeros(4, 2, dtype=torch.float16)
    assert quantizer.get_new_dtype(converter, values, torch.float32) is None
    assert converter.operations[0].dtype == torch.float32  # applied by the op, after decoding, chunk by chunk
