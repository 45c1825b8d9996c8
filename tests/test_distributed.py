"""Pruning across processes (``torchrun``, one process per device; gloo on CPU here) gives every process the model a
single process prunes, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_sparse
from conftest import DEMO_CALIBRATION, DEMO_HELDOUT, save_tiny_with_demo_tokenizer, tiny_llama
from hf_sparse import cli

WORKER = Path(__file__).with_name("distributed_worker.py")
QUICK = {"rounds": 2, "iterations": 10, "refit_iterations": 5}


def _torchrun_two_processes(*script_and_arguments) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, script_and_arguments)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run_two_processes(checkpoint: Path, output: Path, options: dict) -> list[dict]:
    _torchrun_two_processes(WORKER, checkpoint, output, json.dumps(options))
    return [torch.load(output / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("unstructured", 0.6)])
def test_two_processes_prune_exactly_like_one(tmp_path, pattern, sparsity):
    checkpoint = tmp_path / "dense"
    # Five blocks over two processes: an uneven split (3 + 2), so both ranks prune and both receive.
    tiny_llama(num_hidden_layers=5).save_pretrained(checkpoint)
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(3))
    torch.save(ids, checkpoint / "calibration_ids.pt")
    options = dict(method="fista", pattern=pattern, num_samples=6, sequence_length=16, batch_size=3,
                   parallel=True, method_options=QUICK)
    if sparsity is not None:
        options["sparsity"] = sparsity
    ranks = _run_two_processes(checkpoint, tmp_path, options)

    single = AutoModelForCausalLM.from_pretrained(
        checkpoint, sparsity_config=hf_sparse.SparsityConfig(**{**options, "parallel": False, "calibration": ids}))
    expected = single.state_dict()
    assert [rank["blocks_pruned_here"] for rank in ranks] == [3, 2]  # the work really was split
    for rank in ranks:
        assert rank["state"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(rank["state"][key], value), key
        assert rank["record"]["modules"] == single.config.sparsity_config["modules"]
    target = 0.5 if sparsity is None else sparsity
    assert hf_sparse.record.read_record(single.config).overall_sparsity == pytest.approx(target, abs=1e-3)


def test_cli_under_torchrun_writes_one_checkpoint_equal_to_a_single_process(tmp_path):
    model_dir = save_tiny_with_demo_tokenizer(tmp_path / "tiny")
    arguments = ["prune", model_dir, "--method", "fista", "--pattern", "2:4", "--calibration", DEMO_CALIBRATION,
                 "--num-samples", 4, "--sequence-length", 32, "--no-model-card",
                 *[part for key, value in QUICK.items() for part in ("--method-option", f"{key}={value}")]]
    done = _torchrun_two_processes("-m", "hf_sparse", *arguments, "--parallel", "--output", tmp_path / "two",
                                   "--eval-data", DEMO_HELDOUT, "--eval-sequence-length", 32, "--eval-max-windows", 4)
    assert done.stdout.count("pruned perplexity") == 1  # only the main process evaluates and prints
    assert cli.main([str(a) for a in arguments] + ["--output", str(tmp_path / "one")]) == 0
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for key, value in one.items():
        assert torch.equal(two[key], value), key
