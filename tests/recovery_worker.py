"""Run by tests/test_recovery_training.py: recover a pruned checkpoint by distillation from its dense teacher, as one
process of a ``torchrun`` group (gloo on CPU) or alone, optionally killed (SIGKILL) right after a given step.

    python recovery_worker.py STUDENT_DIR TEACHER_DIR OUT_DIR '{"method": "full", ...}' [KILL_AFTER_STEP]

Saves ``OUT_DIR/rank<r>.pt`` (the recovered state dict, the record and the losses) and, with ``"output"`` in the
options, the recovered checkpoint there (rank 0, atomically).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_sparse.recovery import recover


class KillAfter(TrainerCallback):
    """Simulates a kill (no cleanup, no exception handlers) right after step ``step`` was checkpointed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    student_dir, teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    options = json.loads(sys.argv[4])
    kill_after = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.set_num_threads(1)  # two processes on two cores
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    ids = torch.load(student_dir / "train_ids.pt")
    output = options.pop("output", None)
    result = recover(student, None, ids, teacher=str(teacher_dir), output=output, show_progress=False,
                     callbacks=[KillAfter(kill_after)] if kill_after else None, **options)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"state": result.model.state_dict(), "record": result.model.config.sparsity_config,
                "losses": result.losses}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
