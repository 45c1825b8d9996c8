"""The two recovery scripts users run (examples/lora_recovery.py, examples/benchmark_distill.py), run as commands on
the shared 7M model with a few steps: they finish, print their tables, and distilling from the corrected teacher
works end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED

pytestmark = pytest.mark.slow


def _run(script: str, *arguments: str) -> str:
    environment = {**os.environ, "HF_SPARSE_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(REPO / "examples" / script), *arguments], cwd=REPO,
                               env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_lora_recovery_script_prunes_distils_from_a_corrected_teacher_and_keeps_the_masks():
    out = _run("lora_recovery.py", "--steps", "3", "--batch-size", "2", "--max-windows", "2", "--teacher-correction",
               "3", "--threads", "1")
    assert re.search(r"^\| pruned \+ distill\+lm, teacher corrected for 3 steps \| \d+\.\d\d \|$", out, re.M), out
    assert re.search(r"^\| dense \+ same training \(LM loss\) \| \d+\.\d\d \|$", out, re.M), out
    assert "masks unchanged: True; shapes unchanged: True" in out


def test_distillation_benchmark_prints_one_row_per_student_with_the_corrected_teacher():
    """Two students: the second row once crashed on a name the first row's loop had rebound."""
    out = _run("benchmark_distill.py", "--rows", "sleb:0.2,shortgpt:0.2", "--steps", "2", "--batch-size", "2", "--eval-windows",
               "2", "--threads", "1")
    header = next(line for line in out.splitlines() if line.startswith("| student |"))
    assert "+ distillation + LM, corrected teacher" in header
    row = next(line for line in out.splitlines() if line.startswith("| sleb 0.2 | lora |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == header.strip("|").count("|") + 1
    assert all(re.fullmatch(r"\d+\.\d\d", value) for value in cells[2:8]), row  # pruned, 3 objectives, control, dense
    assert re.search(r"^dense \+ same training \(lora\): \d+\.\d\d, \d+ s of CPU", out, re.M), out
    assert any(line.startswith("| shortgpt 0.2 | lora |") for line in out.splitlines()), out
