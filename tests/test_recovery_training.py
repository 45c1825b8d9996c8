"""Recovery as a real training job: two processes (``torchrun``, gloo on CPU) train one model, and a run killed in
the middle resumes from its last checkpoint, leaves no half-written output and ends where an unbroken run ends."""

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

from conftest import tiny_llama

WORKER = Path(__file__).with_name("recovery_worker.py")


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """A dense tiny teacher folder and a 2:4 student folder pruned from it, with training token ids."""
    teacher_dir, student_dir = tmp_path / "dense", tmp_path / "student"
    tiny_llama(0).save_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(teacher_dir)
    hf_sparse.prune(student, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    student.save_pretrained(student_dir)
    torch.save(torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0)),
               student_dir / "train_ids.pt")
    return teacher_dir, student_dir


def _run(*arguments, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(WORKER), *map(str, arguments)], env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_train_one_model_and_keep_the_zeros(tmp_path):
    teacher_dir, student_dir = _folders(tmp_path)
    masks = hf_sparse.get_masks(AutoModelForCausalLM.from_pretrained(student_dir))
    options = {"method": "full", "steps": 4, "batch_size": 2, "sequence_length": 16, "learning_rate": 1e-2,
               "output": str(tmp_path / "out")}
    _run(student_dir, teacher_dir, tmp_path, json.dumps(options), processes=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for key, value in ranks[0]["state"].items():  # DDP: every process holds the same trained weights
        assert torch.equal(ranks[1]["state"][key], value), key
    recovery = ranks[0]["record"]["recovery"]
    assert recovery["tokens"] == 4 * 2 * 16 * 2  # two processes, two sequences each per step
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    after = hf_sparse.get_masks(saved)
    assert all(torch.equal(after[name], mask) for name, mask in masks.items())
    original = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    assert any(not torch.equal(original[k], v) for k, v in ranks[0]["state"].items())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, method):
    teacher_dir, student_dir = _folders(tmp_path)
    options = {"method": method, "steps": 6, "batch_size": 2, "sequence_length": 16, "learning_rate": 1e-2,
               "checkpoint_dir": str(tmp_path / "checkpoints"), "save_steps": 2, "resume": True}
    unbroken = tmp_path / "unbroken"
    unbroken.mkdir()
    _run(student_dir, teacher_dir, unbroken, json.dumps({**options, "checkpoint_dir": str(tmp_path / "other"),
                                                        "output": str(tmp_path / "unbroken-out")}))

    output = tmp_path / "out"
    killed = _run(student_dir, teacher_dir, tmp_path, json.dumps({**options, "output": str(output)}), 3, check=False)
    assert killed.returncode != 0  # SIGKILL right after the step-4 checkpoint
    assert not output.exists()  # nothing half-written where the result goes
    assert not list(tmp_path.glob("out.*")) and not list(tmp_path.glob(".out*"))
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()

    _run(student_dir, teacher_dir, tmp_path, json.dumps({**options, "output": str(output)}))
    resumed = AutoModelForCausalLM.from_pretrained(output).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "unbroken-out").state_dict()
    for key, value in expected.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key
    assert len(torch.load(tmp_path / "rank0.pt", weights_only=False)["losses"]) == 2  # only steps 5 and 6 ran
