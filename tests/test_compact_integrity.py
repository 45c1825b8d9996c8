"""Compact checkpoints refuse damaged or edited data: every case loads (from_pretrained), decompresses (library and
CLI) and must end in one ValueError naming the weight, never in weights.

The checkpoint is the vendored demo model (float16) pruned 2:4 by magnitude; each test edits one thing in a copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_sparse
from conftest import DEMO_MODEL, REPO
from hf_sparse.formats import compress_checkpoint, decompress_checkpoint, decompress_weight
from hf_sparse.formats.compact import compress_weight
from hf_sparse.formats.integrity import check_group, group_hash

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The demo model pruned 2:4 (dense and compact) and pruned 70% unstructured (compact: bitmask form)."""
    root = tmp_path_factory.mktemp("integrity")
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4", sparsity=0.5),
                    show_progress=False)
    model.save_pretrained(root / "dense")
    model.save_pretrained(root / "compact", compressed=True)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", sparsity=0.7), show_progress=False)
    model.save_pretrained(root / "bitmask", compressed=True)
    return root


def _edit(source: Path, target: Path, tensors=None, config=None) -> Path:
    shutil.copytree(source, target)
    if tensors is not None:
        state = load_file(target / "model.safetensors")
        tensors(state)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    return target


def _cut_positions(state):
    state[f"{Q}.weight_positions"] = state[f"{Q}.weight_positions"][:10].clone()


def _duplicate_positions(state):
    state[f"{Q}.weight_positions"] = torch.zeros_like(state[f"{Q}.weight_positions"])  # positions 0, 0 everywhere


def _one_position_byte(state):
    positions = state[f"{Q}.weight_positions"].clone()
    positions[5, 3] ^= 0b11000000  # still two ascending positions? not always: the hash catches it regardless
    state[f"{Q}.weight_positions"] = positions


def _swap_two_positions(state):
    # group 0 of row 7 keeps positions (a, b); writing (b', a') with another valid ascending pair moves weights
    positions = state[f"{Q}.weight_positions"].clone()
    byte = int(positions[7, 0])
    first = byte >> 4
    positions[7, 0] = (byte & 0x0F) | ((0b0001 if first != 0b0001 else 0b0010) << 4)  # (0,1) or (0,2)
    state[f"{Q}.weight_positions"] = positions


def _layout_1_of_2(state):
    state[f"{Q}.weight_layout"] = torch.tensor([256, 256, 1, 2])


def _values_int8(state):
    state[f"{Q}.weight"] = state[f"{Q}.weight"].float().to(torch.int8)


def _values_float32(state):
    state[f"{Q}.weight"] = state[f"{Q}.weight"].float()


def _layout_int32(state):
    state[f"{Q}.weight_layout"] = state[f"{Q}.weight_layout"].to(torch.int32)


def _layout_negative(state):
    state[f"{Q}.weight_layout"] = torch.tensor([-256, 256, 2, 4])


def _layout_rows(state):
    state[f"{Q}.weight_layout"] = torch.tensor([128, 512, 2, 4])


def _positions_removed(state):
    del state[f"{Q}.weight_positions"]


def _group_made_dense(state):
    dense = decompress_weight({s: state[f"{Q}.{s}"] for s in ("weight", "weight_positions", "weight_layout")})
    for suffix in ("weight_positions", "weight_layout"):
        del state[f"{Q}.{suffix}"]
    state[f"{Q}.weight"] = dense


def _unknown_entry(state):
    state[f"{Q}.weight_extra"] = torch.zeros(1)
    state[f"{Q}.weight_layout"] = state[f"{Q}.weight_layout"]


def _values_scaled(state):
    state[f"{Q}.weight"] = state[f"{Q}.weight"] * 2


CASES = {
    "positions cut to 10 rows": (_cut_positions, "shape \\(256, 32\\).*\\(10, 32\\)"),
    "duplicate positions": (_duplicate_positions, "repeated or out of order"),
    "one position byte changed": (_one_position_byte, "content hash|repeated or out of order"),
    "other valid positions": (_swap_two_positions, "content hash"),
    "layout 2:4 -> 1:2": (_layout_1_of_2, "says 1:2 but the record says the module was pruned 2:4"),
    "values retyped to int8": (_values_int8, "dtype torch.int8"),
    "values retyped to float32": (_values_float32, "content hash"),
    "layout int32": (_layout_int32, "must be int64"),
    "layout negative rows": (_layout_negative, "rows"),
    "layout other shape": (_layout_rows, "\\(128, 512\\) but the model's weight is \\(256, 256\\)"),
    "positions removed": (_positions_removed, "exactly one of"),
    "group replaced by dense weight": (_group_made_dense, "does not store in compact form"),
    "values doubled": (_values_scaled, "content hash"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_damaged_compact_checkpoint_never_loads_or_decompresses(checkpoints, tmp_path, case):
    edit, message = CASES[case]
    folder = _edit(checkpoints / "compact", tmp_path / "tampered", tensors=edit)
    with pytest.raises(ValueError, match=message) as caught:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    assert Q in str(caught.value) or "storage.sha256" in str(caught.value)
    with pytest.raises(ValueError, match=message):
        decompress_checkpoint(folder, tmp_path / "dense", show_progress=False)
    assert not (tmp_path / "dense").exists()


def test_cli_decompress_of_a_damaged_checkpoint_exits_1_with_one_line(checkpoints, tmp_path):
    folder = _edit(checkpoints / "compact", tmp_path / "tampered", tensors=_swap_two_positions)
    result = subprocess.run([sys.executable, "-m", "hf_sparse", "decompress", str(folder), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert "Traceback" not in result.stderr and f"{Q}.weight" in result.stderr and "content hash" in result.stderr


def test_record_edits_are_caught_too(checkpoints, tmp_path):
    def claim_other_sparsity(config):
        config["sparsity_config"]["modules"][Q] = 0.25

    def edit_hash(config):
        config["sparsity_config"]["storage"]["sha256"][Q] = "0" * 64

    def drop_a_hash(config):
        del config["sparsity_config"]["storage"]["sha256"][Q]

    def hash_for_unknown_module(config):
        config["sparsity_config"]["storage"]["sha256"]["model.layers.9.mlp.up_proj"] = "0" * 64

    def bad_hash_text(config):
        config["sparsity_config"]["storage"]["sha256"][Q] = "<img src=x onerror=alert(1)>"

    cases = [(claim_other_sparsity, "sparsity 0.500000 but the record says 0.250000"),
             (edit_hash, "content hash"), (drop_a_hash, "has no content hash"),
             (hash_for_unknown_module, "does not store in compact form"),
             (bad_hash_text, "64 lowercase hex digits")]
    for index, (edit, message) in enumerate(cases):
        folder = _edit(checkpoints / "compact", tmp_path / f"edited{index}", config=edit)
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(folder)
        with pytest.raises(ValueError, match=message):
            decompress_checkpoint(folder, tmp_path / f"dense{index}", show_progress=False)


def test_bitmask_damage_is_refused(checkpoints, tmp_path):
    def padding_or_count(state):
        mask = state[f"{UP}.weight_bitmask"].clone()
        mask[0, 0] ^= 0xFF  # marks a different number of weights than values are stored
        state[f"{UP}.weight_bitmask"] = mask

    def values_2d(state):
        state[f"{UP}.weight"] = state[f"{UP}.weight"].reshape(1, -1)

    for index, (edit, message) in enumerate([(padding_or_count, "marks \\d+ weights but \\d+ values"),
                                             (values_2d, "must be 1-D")]):
        folder = _edit(checkpoints / "bitmask", tmp_path / f"bad{index}", tensors=edit)
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(folder)


def test_checkpoint_without_hashes_loads_with_a_warning(checkpoints, tmp_path, caplog):
    def no_hashes(config):
        del config["sparsity_config"]["storage"]["sha256"]

    folder = _edit(checkpoints / "compact", tmp_path / "old", config=no_hashes)
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert "without content hashes" in caplog.text and "cannot be verified" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(checkpoints / "dense")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    # structure is still checked without hashes
    broken = _edit(folder, tmp_path / "old-broken", tensors=_duplicate_positions)
    with pytest.raises(ValueError, match="repeated or out of order"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_hashes_are_written_for_every_compressed_weight_and_verify(checkpoints, tmp_path):
    config = json.loads((checkpoints / "compact" / "config.json").read_text())
    storage = config["sparsity_config"]["storage"]
    assert len(storage["sha256"]) == sum(storage["encodings"].values()) - storage["encodings"].get("dense", 0) == 42
    state = load_file(checkpoints / "compact" / "model.safetensors")
    parts = {s: state[f"{Q}.{s}"] for s in ("weight", "weight_positions", "weight_layout")}
    assert group_hash(parts) == storage["sha256"][Q]
    # compress_checkpoint writes the same hashes as save_pretrained(compressed=True)
    compress_checkpoint(checkpoints / "dense", tmp_path / "again", show_progress=False)
    again = json.loads((tmp_path / "again" / "config.json").read_text())["sparsity_config"]["storage"]["sha256"]
    assert again == storage["sha256"]


def test_compress_refuses_weights_the_record_does_not_describe(checkpoints, tmp_path):
    def unpruned(state):
        state[f"{Q}.weight"] = torch.randn(256, 256).half()

    folder = _edit(checkpoints / "dense", tmp_path / "unpruned", tensors=unpruned)
    with pytest.raises(ValueError, match=f"'{Q}' does not follow the pattern '2:4'"):
        compress_checkpoint(folder, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="does not follow the pattern"):
        model.save_pretrained(tmp_path / "out2", compressed=True)
    assert not (tmp_path / "out2").exists()

    def sparser(state):
        weight = state[f"{Q}.weight"].clone()
        weight[:8] = 0
        state[f"{Q}.weight"] = weight

    folder = _edit(checkpoints / "dense", tmp_path / "sparser", tensors=sparser)
    with pytest.raises(ValueError, match="but its sparsity record says 0.500000"):
        compress_checkpoint(folder, tmp_path / "out3", show_progress=False)

    def missing(config):
        config["sparsity_config"]["modules"]["model.layers.0.mlp.nonexistent"] = 0.5

    folder = _edit(checkpoints / "dense", tmp_path / "missing", config=missing)
    with pytest.raises(ValueError, match="lists module 'model.layers.0.mlp.nonexistent'"):
        compress_checkpoint(folder, tmp_path / "out4", show_progress=False)


def test_cli_compress_of_unpruned_weights_under_a_2_4_record_exits_1(checkpoints, tmp_path):
    def unpruned(state):
        state[f"{Q}.weight"] = torch.randn(256, 256).half()

    folder = _edit(checkpoints / "dense", tmp_path / "unpruned", tensors=unpruned)
    result = subprocess.run([sys.executable, "-m", "hf_sparse", "compress", str(folder), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "Traceback" not in result.stderr and "does not follow" in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_group_exact_small_cases():
    weight = torch.tensor([[0., 1., 0., 2.] * 2] * 2)
    parts = compress_weight(weight, "2:4")
    check_group("lin", parts, pattern="2:4", sparsity=0.5, shape=(2, 8), expected_hash=group_hash(parts))
    with pytest.raises(ValueError, match="sparsity 0.500000 but the record says 0.000000"):
        check_group("lin", parts, sparsity=0.0)
    with pytest.raises(ValueError, match="record says the module was pruned unstructured"):
        check_group("lin", parts, pattern="unstructured")
    m8 = compress_weight(torch.tensor([[0.] * 7 + [1.]]), "1:8")  # 3 bits used of one byte: 5 padding bits
    bad = dict(m8, weight_positions=m8["weight_positions"] | 1)
    with pytest.raises(ValueError, match="padding bits"):
        check_group("lin", bad)
    out_of_range = compress_weight(torch.tensor([[0., 0., 1.]]), "1:3")
    out_of_range["weight_positions"] = torch.tensor([[0b11000000]], dtype=torch.uint8)  # position 3 of 3
    with pytest.raises(ValueError, match=">= 3"):
        check_group("lin", out_of_range)
    # a hostile entry name is cut in the message
    with pytest.raises(ValueError) as caught:
        check_group("x" * 10_000, {"weight": torch.zeros(1)}, shape=(2,))
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("index,message", [
    ({"metadata": {}, "weight_map": {"a": "../../evil.safetensors"}}, "names the shard '../../evil.safetensors'"),
    ({"weight_map": {"a": "/etc/passwd"}}, "names the shard '/etc/passwd'"),
    ({"weight_map": {"a": "other.safetensors"}}, "which is not in"),
    ({"metadata": {}}, "has no weight_map object"),
    ([1], "must hold a JSON object, got list"),
])
def test_a_shard_index_never_points_outside_the_checkpoint(checkpoints, tmp_path, index, message):
    for kind, tool in (("dense", compress_checkpoint), ("compact", decompress_checkpoint)):
        folder = _edit(checkpoints / kind, tmp_path / f"{kind}-index")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="model.safetensors.index.json") as caught:
            tool(folder, tmp_path / f"{kind}-out", show_progress=False)
        assert message in str(caught.value)
        assert not (tmp_path / f"{kind}-out").exists() and not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("text,message", [("[1]", "must hold a JSON object, got list"),
                                          ("{nope", "is not valid JSON"),
                                          ('{"quantization_config": "x", "sparsity_config": {}}',
                                           "has a quantization_config ('x')")])
def test_a_broken_config_json_is_one_line(checkpoints, tmp_path, text, message):
    folder = _edit(checkpoints / "dense", tmp_path / "broken")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError) as caught:
        compress_checkpoint(folder, tmp_path / "out", show_progress=False)
    assert message in str(caught.value)


def test_cli_eval_of_a_damaged_checkpoint_prints_our_line_not_a_conversion_report(checkpoints, tmp_path):
    folder = _edit(checkpoints / "compact", tmp_path / "tampered", tensors=_duplicate_positions)
    result = subprocess.run([sys.executable, "-m", "hf_sparse", "eval", str(folder), "--data",
                             str(REPO / "demo" / "heldout-slice.txt")], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "perplexity" not in result.stdout
    assert "repeated or out of order" in result.stderr and f"{Q}.weight" in result.stderr
    assert "automatic conversion" not in result.stderr and "Traceback" not in result.stderr


def test_compress_refuses_a_record_listing_a_one_dimensional_weight(checkpoints, tmp_path):
    def norm(config):
        config["sparsity_config"]["modules"]["model.norm"] = 0.0

    folder = _edit(checkpoints / "dense", tmp_path / "norm", config=norm)
    with pytest.raises(ValueError, match=r"lists module 'model.norm' but its weight has shape \(256,\)"):
        compress_checkpoint(folder, tmp_path / "out", show_progress=False)
