"""Hostile structure records: every number bounded by the model it describes, every name a module that exists, no
duplicates, the record checked against the tensors before anything is built, and one-line errors naming the field.

Checkpoints: tiny random Llamas (4 blocks) pruned with FLAP (per-block shapes, loading "hf_sparse"), ShortGPT (blocks
removed, loading "config") and DISP-LLM (residual selections); each test edits a copy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hf_sparse
from conftest import REPO, tiny_llama
from hf_sparse.record import SparsityRecord
from hf_sparse.surgery import validate_structure

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def _config(method: str, sparsity: float = 0.3, **options):
    return hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity, calibration=IDS,
                                    num_samples=4, sequence_length=32, method_options=options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for name, config in (("flap", _config("flap")), ("short", _config("shortgpt", 0.5)),
                         ("disp", _config("disp_llm", steps=2, windows_per_step=2))):
        model = tiny_llama(num_hidden_layers=4)
        hf_sparse.prune(model, config, show_progress=False)
        model.save_pretrained(root / name)
    return root


def _edit(source: Path, target: Path, config=None, tensors=None) -> Path:
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(target / "model.safetensors")
        tensors(state)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _structure(data):
    return data["sparsity_config"]["structure"]


def _load_error(folder: Path) -> str:
    with pytest.raises(ValueError) as caught:
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    return message


# --- the record alone (validate_structure) ------------------------------------------------------------------------

def _set(path, value):
    def edit(data):
        target = _structure(data)
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


RECORD_CASES = {
    "10**9 attention heads": (("blocks", 0, "attention_heads"), 10 ** 9, "at most original.attention_heads"),
    "10**9 kv heads": (("blocks", 0, "kv_heads"), 10 ** 9, "at most original.kv_heads"),
    "mlp channels above the original": (("blocks", 1, "mlp_channels"), 129, "at most original.mlp_channels"),
    "boolean count": (("blocks", 1, "mlp_channels"), True, "positive integer"),
    "original 10**12 heads": (("original", "attention_heads"), 10 ** 12, "positive integers"),
    "original block_parameters 0": (("original", "block_parameters"), 0, "positive integers"),
    "block_parameters 0": (("block_parameters",), 0, "block_parameters must be a positive integer"),
    "block_parameters above the original": (("block_parameters",), 10 ** 9, "at most original.block_parameters"),
    "duplicate removed blocks": (("removed_blocks",), [2, 2, 3], "without repeats"),
    "unsorted removed blocks": (("removed_blocks",), [3, 2], "increasing"),
    "new_biases __class__": (("blocks", 0, "new_biases"), ["__class__"], "distinct module names"),
    "new_biases path": (("blocks", 0, "new_biases"), ["../../etc/passwd"], "distinct module names"),
    "new_biases backtick": (("blocks", 0, "new_biases"), ["mlp`down"], "distinct module names"),
    "new_biases twice": (("blocks", 0, "new_biases"), ["mlp.down_proj", "mlp.down_proj"], "distinct"),
    "original_index out of order": (("blocks", 1, "original_index"), 0, "original_index must be 1"),
    "unknown block key": (("blocks", 0, "extra"), 1, "unknown keys"),
    "unknown original key": (("original", "experts"), 8, "unknown keys"),
    "loading elsewhere": (("loading",), "remote", "loading must be"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES), ids=list(RECORD_CASES))
def test_hostile_flap_record_is_refused_before_anything_is_built(saved, tmp_path, case):
    path, value, message = RECORD_CASES[case]
    folder = _edit(saved / "flap", tmp_path / "edited", config=_set(path, value))
    start = time.process_time()
    assert message in _load_error(folder)
    assert time.process_time() - start < 60  # nothing of the claimed size was built (a 10**9 tuple takes minutes)


def test_removed_blocks_duplicate_is_refused_by_the_validator():
    structure = {"version": 1, "original": {"num_blocks": 6, "block_parameters": 100}, "removed_blocks": [2, 2, 4],
                 "blocks": [{"original_index": i} for i in (0, 1, 3, 5)], "block_parameters": 50,
                 "loading": "config"}
    with pytest.raises(ValueError, match=r"without repeats, got \[2, 2, 4\]"):
        validate_structure(copy.deepcopy(structure))
    structure["removed_blocks"] = [2, 4]
    structure["blocks"] = [{"original_index": i} for i in (0, 1, 3, 5)]
    assert validate_structure(copy.deepcopy(structure)) == structure
    huge = dict(structure, original={"num_blocks": 10 ** 9, "block_parameters": 100})
    with pytest.raises(ValueError, match="remaining blocks"):
        validate_structure(huge)


def test_hostile_values_are_cut_in_messages():
    structure = {"version": 1, "original": {"num_blocks": 1, "block_parameters": 10}, "removed_blocks": [],
                 "blocks": [{"original_index": 0, "new_biases": ["x" * 1_000_000]}], "block_parameters": 5,
                 "loading": "config"}
    with pytest.raises(ValueError) as caught:
        validate_structure(structure)
    assert len(str(caught.value)) < 300


def test_model_card_of_a_record_with_zero_parameters_cannot_happen():
    record = {"format": "hf_sparse", "format_version": 2, "method": "flap", "pattern": "structured",
              "target_sparsity": 0.3, "overall_sparsity": 0.3, "modules": {},
              "structure": {"version": 1, "original": {"num_blocks": 1, "block_parameters": 0}, "removed_blocks": [],
                            "blocks": [{"original_index": 0}], "block_parameters": 0, "loading": "config"}}
    with pytest.raises(ValueError, match="original must map dimension names to positive integers"):
        SparsityRecord.from_dict(record)


# --- the record against the model and the tensors -----------------------------------------------------------------

def test_new_bias_on_a_module_that_is_not_a_linear_of_the_block(saved, tmp_path):
    folder = _edit(saved / "flap", tmp_path / "edited", config=_set(("blocks", 0, "new_biases"), ["mlp.act_fn"]))
    assert "'mlp.act_fn', which is not a linear layer of the block" in _load_error(folder)
    folder = _edit(saved / "flap", tmp_path / "edited2", config=_set(("blocks", 0, "new_biases"), ["mlp.gate"]))
    assert "not a linear layer" in _load_error(folder)


def test_original_dimensions_must_be_the_models(saved, tmp_path):
    def bigger(data):
        _structure(data)["original"]["attention_heads"] = 10 ** 6
        _structure(data)["original"]["kv_heads"] = 10 ** 6
        for block in _structure(data)["blocks"]:
            block["attention_heads"] = block["kv_heads"] = 10 ** 6

    start = time.process_time()
    message = _load_error(_edit(saved / "flap", tmp_path / "edited", config=bigger))
    assert "has attention_heads 4 but the record says 1000000" in message
    assert time.process_time() - start < 60


def test_record_shapes_that_differ_from_the_stored_tensors(saved, tmp_path):
    def fewer_channels(data):
        _structure(data)["blocks"][0]["mlp_channels"] -= 1

    message = _load_error(_edit(saved / "flap", tmp_path / "edited", config=fewer_channels))
    assert "model.layers.0.mlp" in message and "sparsity_config.structure gives" in message


def test_flap_config_with_more_blocks_than_saved(saved, tmp_path):
    def more_blocks(data):
        data["num_hidden_layers"] = 5

    assert "lists 4 blocks but the model has 5" in _load_error(_edit(saved / "flap", tmp_path / "more",
                                                                     config=more_blocks))


def test_shortgpt_with_num_hidden_layers_raised_does_not_load_random_blocks(saved, tmp_path):
    def raised(data):
        data["num_hidden_layers"] = 4

    folder = _edit(saved / "short", tmp_path / "raised", config=raised)
    assert "lists 2 blocks but the model has 4" in _load_error(folder)
    # and the CLI's eval stops with that line instead of printing a perplexity
    (tmp_path / "text.txt").write_text("hello world " * 50)
    result = subprocess.run([sys.executable, "-m", "hf_sparse", "eval", str(folder), "--data",
                             str(tmp_path / "text.txt")], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "perplexity" not in result.stdout
    assert "lists 2 blocks but the model has 4" in result.stderr and "Traceback" not in result.stderr


def test_shortgpt_checkpoint_still_loads(saved):
    model = transformers.AutoModelForCausalLM.from_pretrained(saved / "short")
    assert len(model.model.layers) == 2


@pytest.mark.parametrize("value", [10 ** 6, -1])
def test_disp_llm_residual_index_out_of_range_is_refused_at_load(saved, tmp_path, value):
    def edit(state):
        key = next(k for k in state if k.endswith("residual_dims.mlp_output"))
        indices = state[key].clone()
        indices[-1 if value > 0 else 0] = value
        state[key] = indices

    message = _load_error(_edit(saved / "disp", tmp_path / "edited", tensors=edit))
    assert "residual_dims.mlp_output must be increasing indices in [0, 64)" in message


def test_disp_llm_residual_index_repeated_or_missing(saved, tmp_path):
    def repeat(state):
        key = next(k for k in state if k.endswith("residual_dims.mlp_output"))
        indices = state[key].clone()
        indices[1] = indices[0]
        state[key] = indices

    assert "must be increasing indices" in _load_error(_edit(saved / "disp", tmp_path / "repeat", tensors=repeat))

    def drop(state):
        del state[next(k for k in state if k.endswith("residual_dims.mlp_output"))]

    assert "the checkpoint has no 'model.layers" in _load_error(_edit(saved / "disp", tmp_path / "drop", tensors=drop))


def test_disp_llm_checkpoint_still_loads_and_runs(saved):
    model = transformers.AutoModelForCausalLM.from_pretrained(saved / "disp")
    with torch.no_grad():
        assert torch.isfinite(model(IDS[:1]).logits).all()


def test_extra_block_tensor_in_the_checkpoint_is_refused(saved, tmp_path):
    def extra(state):
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)

    assert "model.layers.0.mlp.extra.weight" in _load_error(_edit(saved / "flap", tmp_path / "extra", tensors=extra))


def test_disp_llm_record_claiming_a_huge_hidden_size_builds_nothing(saved, tmp_path):
    def huge(data):
        structure = _structure(data)
        structure["original"]["hidden_size"] = 10 ** 9
        for block in structure["blocks"]:
            block["residual_dims"] = {point: 10 ** 9 - 1 for point in block["residual_dims"]}

    start = time.process_time()
    message = _load_error(_edit(saved / "disp", tmp_path / "huge", config=huge))
    assert "original.hidden_size is 1000000000 but the model's residual width is 64" in message
    assert time.process_time() - start < 60
