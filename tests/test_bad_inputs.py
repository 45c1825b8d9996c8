"""Bad library inputs, table-driven: each must raise a one-line ``ValueError`` naming the value and what is allowed.

The README's reliability section quotes the count of cases here (``len(CASES)``). Cases that need a saved
checkpoint and the before-the-load guarantee live in ``test_config_errors.py`` and ``test_reliability.py``;
tampered records in ``test_reliability.py`` and ``test_integration_transformers.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse import SparsityConfig
from hf_sparse.calibration import load_calibration, read_texts
from hf_sparse.validation import positive_int
from hf_sparse.recovery import RecoveryConfig


@dataclass
class Case:
    id: str
    call: Callable[[Path], Any]  # gets a fresh tmp_path
    expected: str  # regular expression searched in the message


def config(**fields) -> Callable[[Path], Any]:
    return lambda _tmp: SparsityConfig(**fields)


def options(method: str, **values) -> Callable[[Path], Any]:
    return lambda _tmp: SparsityConfig(method=method, method_options=values)


def recovery(**fields) -> Callable[[Path], Any]:
    return lambda _tmp: RecoveryConfig(**fields)


def ids_calibration(ids: Any, sequence_length: int = 16) -> Callable[[Path], Any]:
    """Prune a tiny Llama (vocabulary 128, context 128) with token ids as calibration."""
    return lambda _tmp: hf_sparse.prune(
        tiny_llama(), SparsityConfig(method="wanda", calibration=ids, num_samples=4, sequence_length=sequence_length),
        show_progress=False)


def calibration_file(name: str, content: bytes | str) -> Callable[[Path], Any]:
    def call(tmp: Path):
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return read_texts(str(path))

    return call


def _empty_folder(tmp: Path):
    (tmp / "empty").mkdir()
    return read_texts(str(tmp / "empty"))


def _ids(rows: int = 4, columns: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (rows, columns), generator=torch.Generator().manual_seed(0))


CASES = [
    # SparsityConfig fields: names, ranges, patterns, regular expressions, cross-field rules
    Case("unknown method", config(method="lottery"), r"unknown pruning method 'lottery'; registered methods: .*'wanda'"),
    Case("sparsity 1.0", config(method="magnitude", sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0$"),
    Case("sparsity -0.1", config(method="magnitude", sparsity=-0.1), r"sparsity must be in \[0, 1\), got -0.1$"),
    Case("sparsity 'half'", config(method="magnitude", sparsity="half"),
         r"sparsity must be a number in \[0, 1\), got 'half'"),
    Case("sparsity True", config(method="magnitude", sparsity=True),
         r"sparsity must be a number in \[0, 1\), got True \(bool\)"),
    Case("sparsity nan", config(method="magnitude", sparsity=float("nan")),
         r"sparsity must be a number in \[0, 1\), got nan"),
    Case("pattern 3:2", config(pattern="3:2"), r"pattern '3:2' is not valid: N:M needs 0 < N < M"),
    Case("pattern 2-4", config(pattern="2-4"), r"pattern '2-4' is not valid: use 'unstructured' or 'N:M' such as '2:4'"),
    Case("pattern blocky", config(pattern="blocky"),
         r"pattern 'blocky' is not valid: use 'unstructured' or 'N:M' such as '2:4'"),
    Case("pattern 24 (int)", config(pattern=24), r"pattern must be a string such as 'unstructured', '2:4'.*got 24"),
    Case("sparsity contradicting 2:4", config(sparsity=0.7, pattern="2:4"),
         r"sparsity 0.7 contradicts pattern '2:4', which fixes sparsity at 0.5"),
    Case("include regex", config(include=["(bad"]), r"include entry '\(bad' is not a valid regular expression"),
    Case("include not a list", config(include=3), r"include must be a list of regular expressions on module names, got 3"),
    Case("num_samples 0", config(num_samples=0), r"num_samples must be a positive integer, got 0"),
    Case("sequence_length True", config(sequence_length=True),
         r"sequence_length must be a positive integer, got True \(bool\)"),
    Case("batch_size 2.0", config(batch_size=2.0), r"batch_size must be a positive integer, got 2.0 \(float\)"),
    Case("seed '1'", config(seed="1"), r"seed must be an integer, got '1' \(str\)"),
    Case("num_workers 0", config(num_workers=0), r"num_workers must be a positive integer or None, got 0"),
    Case("parallel 'yes'", config(parallel="yes"), r"parallel must be True or False, got 'yes' \(str\)"),
    Case("parallel with a sequential method", config(method="wanda", parallel=True),
         r"parallel=True needs a method whose blocks are independent .*'wanda'"),
    Case("calibration_subset 3", config(calibration_subset=3), r"calibration_subset must be a string or None, got 3"),
    Case("device 'gpu!'", config(device="gpu!"), r"device 'gpu!' is not a valid torch device"),
    Case("method_options a list", config(method_options=[1]), r"method_options must be a dict, got \[1\] \(list\)"),
    Case("from_dict unknown field", lambda _tmp: SparsityConfig.from_dict({"method": "magnitude", "sparsity_level": 0.5}),
         r"unknown SparsityConfig field\(s\) \['sparsity_level'\]; allowed: .*'sparsity'"),
    Case("prune with a string config", lambda _tmp: hf_sparse.prune(tiny_llama(), "wanda"),
         r"config must be a hf_sparse.SparsityConfig or a dict, got str"),
    # Method options: unknown keys and declared types
    Case("unknown sparsegpt option", options("sparsegpt", blocksize=128),
         r"unknown option\(s\) \['blocksize'\] for method 'sparsegpt'; allowed: \['block_size', 'dampening'\]"),
    Case("sparsegpt block_size 0", options("sparsegpt", block_size=0),
         r"sparsegpt block_size must be a positive integer, got 0"),
    Case("sparsegpt block_size -8", options("sparsegpt", block_size=-8),
         r"sparsegpt block_size must be a positive integer, got -8"),
    Case("sparsegpt block_size 'big'", options("sparsegpt", block_size="big"),
         r"sparsegpt block_size must be a positive integer, got 'big'"),
    Case("sparsegpt block_size True", options("sparsegpt", block_size=True),
         r"sparsegpt block_size must be a positive integer, got True \(bool\)"),
    Case("sparsegpt dampening '0.5'", options("sparsegpt", dampening="0.5"),
         r"sparsegpt dampening must be a number in \(0, 1\), got '0.5' \(str\)"),
    Case("sparsegpt dampening None", options("sparsegpt", dampening=None),
         r"sparsegpt dampening must be a number in \(0, 1\), got None \(NoneType\)"),
    Case("sparsegpt dampening 1.5", options("sparsegpt", dampening=1.5),
         r"sparsegpt dampening must be in \(0, 1\), got 1.5$"),
    Case("magnitude per_row 'maybe'", options("magnitude", per_row="maybe"),
         r"magnitude per_row must be True or False, got 'maybe' \(str\)"),
    Case("magnitude per_row 2", options("magnitude", per_row=2), r"magnitude per_row must be True or False, got 2 \(int\)"),
    Case("fista xi nan", options("fista", xi=float("nan")), r"fista xi must be a number in \(0, 1\), got nan"),
    Case("fista refit_iterations -1", options("fista", refit_iterations=-1),
         r"fista refit_iterations must be an integer >= 0, got -1"),
    Case("fista lambda_init 0", options("fista", lambda_init=0), r"fista lambda_init must be a positive number, got 0"),
    Case("wanda takes no option", options("wanda", per_row=True),
         r"unknown option\(s\) \['per_row'\] for method 'wanda'; allowed: none"),
    # RecoveryConfig
    Case("recovery learning_rate inf", recovery(learning_rate=float("inf")),
         r"learning_rate must be a positive number or None, got inf \(float\)"),
    Case("recovery rank 0", recovery(rank=0), r"rank must be a positive integer, got 0"),
    Case("recovery mode", recovery(mode="full"), r"mode must be one of \('masked', 'merge'\), got 'full'"),
    Case("recovery warmup_ratio 1.0", recovery(warmup_ratio=1.0), r"warmup_ratio must be in \[0, 1\), got 1.0"),
    Case("recovery dropout -0.1", recovery(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    Case("recovery target_modules 3", recovery(target_modules=3),
         r"target_modules must be a string or a list of strings, got 3 \(int\)"),
    Case("recovery alpha '2'", recovery(alpha="2"), r"alpha must be a positive number or None, got '2' \(str\)"),
    Case("recovery steps '10'", recovery(steps="10"), r"steps must be a positive integer, got '10' \(str\)"),
    # Token ids
    Case("token id outside the vocabulary", ids_calibration(torch.full((4, 16), 128)),
         r"calibration token id 128 is outside the model's vocabulary: ids must be in \[0, 127\]"),
    Case("negative token id", ids_calibration(torch.full((4, 16), -1)),
         r"calibration token id -1 is negative: ids must be >= 0"),
    Case("empty token tensor", ids_calibration(torch.zeros((0, 16), dtype=torch.long)),
         r"token-id calibration is empty \(shape \(0, 16\)\)"),
    Case("bool tensor as ids", ids_calibration(torch.ones((4, 16), dtype=torch.bool)),
         r"token-id calibration must be a 2-D integer tensor .*got dtype=torch.bool"),
    Case("complex tensor as ids", ids_calibration(torch.ones((4, 16), dtype=torch.complex64)),
         r"token-id calibration must be a 2-D integer tensor .*got dtype=torch.complex64"),
    Case("float tensor as ids", ids_calibration(torch.ones((4, 16))),
         r"token-id calibration must be a 2-D integer tensor .*got dtype=torch.float32"),
    Case("1-D tensor as ids", ids_calibration(torch.ones(16, dtype=torch.long)),
         r"token-id calibration must be a 2-D integer tensor .*shape=\(16,\)"),
    Case("ragged id lists", ids_calibration([[1, 2, 3], [1, 2]]),
         r"token-id calibration rows must all have the same length, got lengths \[2, 3\]"),
    Case("floats in id lists", ids_calibration([[1, 2.5], [1, 2]]),
         r"token-id calibration must hold integers, got 2.5 \(float\)"),
    Case("windows beyond the context", ids_calibration(_ids(4, 256), sequence_length=256),
         r"sequence_length=256 is longer than the model's context \(max_position_embeddings=128\); use "
         r"sequence_length <= 128"),
    Case("no calibration for wanda", lambda _tmp: hf_sparse.prune(tiny_llama(), SparsityConfig(method="wanda")),
         r"method 'wanda' needs calibration data: set SparsityConfig\(calibration=...\)"),
    Case("no calibration to load_calibration", lambda _tmp: load_calibration(None),
         r"this method needs calibration data"),
    Case("empty calibration list", lambda _tmp: load_calibration([]), r"calibration \[\] is empty"),
    Case("unsupported calibration type", lambda _tmp: load_calibration(42),
         r"calibration source of type int is not supported"),
    Case("text without a tokenizer", lambda _tmp: load_calibration(["text"], None, 1, 4),
         r"text calibration needs a tokenizer: pass tokenizer=..."),
    # Calibration files
    Case("non-UTF-8 file", calibration_file("latin1.txt", "caf\xe9".encode("latin-1")),
         r"calibration file '.*latin1.txt' is not UTF-8 text \(byte 3: "),
    Case("malformed JSON", calibration_file("rows.json", '[{"text": "a"},'),
         r"calibration file '.*rows.json' is not valid JSON: Expecting value: line 1 column 16"),
    Case("malformed JSON Lines", calibration_file("rows.jsonl", '{"text": "a"}\n{"text": \n'),
         r"calibration file '.*rows.jsonl' is not valid JSON Lines: "),
    Case("JSON of a number", calibration_file("number.json", "5"),
         r"calibration file '.*number.json' must hold a list of rows \(objects or strings\), got int"),
    Case("JSON rows without the column", calibration_file("rows.jsonl", '{"body": "a"}\n'),
         r"calibration file '.*rows.jsonl' has rows without the column 'text'"),
    Case("non-UTF-8 JSON", calibration_file("rows.json", b'[{"text": "\xff"}]'),
         r"calibration file '.*rows.json' is not UTF-8 text"),
    Case("missing calibration path", lambda tmp: read_texts(str(tmp / "missing.txt")),
         r"calibration path '.*missing.txt' does not exist"),
    Case("folder without text files", _empty_folder, r"calibration folder '.*empty' has no \('.txt'"),
    Case("raw text given as a path", lambda _tmp: read_texts("word " * 100),
         r"calibration string 'word word .*is neither an existing path nor a dataset name"),
    Case("text shorter than one window", lambda _tmp: load_calibration(
        ["a b"], lambda text, **_: {"input_ids": torch.tensor([[1, 2]])}, 1, 8),
         r"calibration text has 2 tokens, fewer than one window of sequence_length=8"),
    # Records, masks and the CLI's shared integer check
    Case("get_masks of an unpruned model", lambda _tmp: hf_sparse.get_masks(tiny_llama()),
         r"this model has no 'sparsity_config' in its config: it was not pruned by hf_sparse"),
    Case("record of the wrong type", lambda _tmp: hf_sparse.SparsityRecord.from_dict(["wanda"]),
         r"sparsity_config in config.json must be an object, got list"),
    Case("record missing modules", lambda _tmp: hf_sparse.SparsityRecord.from_dict(
        {"format": "hf_sparse", "format_version": 1, "method": "magnitude", "pattern": "2:4",
         "target_sparsity": 0.5, "overall_sparsity": 0.5}), r"sparsity_config.modules is missing"),
    Case("record format_version True", lambda _tmp: hf_sparse.SparsityRecord.from_dict(
        {"format": "hf_sparse", "format_version": True}), r"sparsity_config.format_version True is not supported"),
    Case("positive_int helper", lambda _tmp: positive_int("--num-samples", -2),
         r"--num-samples must be a positive integer, got -2"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path):
    with pytest.raises(ValueError) as error:
        case.call(tmp_path)
    message = str(error.value)
    assert re.search(case.expected, message), f"{message!r} does not match {case.expected!r}"
    assert "\n" not in message, "the message must be one line"


def test_case_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------------------
# What is accepted instead: spellings of booleans, integers for floats, and what the record then says


@pytest.mark.parametrize("spelling,expected", [("true", True), ("False", False), ("1", True), ("0", False),
                                               (" TRUE ", True), (1, True), (0, False), (False, False)])
def test_boolean_spellings_become_booleans(spelling, expected):
    cfg = SparsityConfig(method="magnitude", method_options={"per_row": spelling})
    assert cfg.method_options["per_row"] is expected
    record = hf_sparse.prune(tiny_llama(), cfg, show_progress=False)
    assert record.method_options["per_row"] is expected
    assert json.loads(json.dumps(record.to_dict()))["method_options"]["per_row"] is expected


def test_an_integer_for_a_float_option_is_a_float():
    cfg = SparsityConfig(method="fista", method_options={"lambda_init": 2})
    assert hf_sparse.methods.build_method("fista", cfg.method_options).options.lambda_init == 2.0
    assert SparsityConfig(method="magnitude", sparsity=0).sparsity == 0.0
