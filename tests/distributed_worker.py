"""Run by ``torchrun`` from tests/test_distributed.py: every process loads the same checkpoint with
``sparsity_config=SparsityConfig(..., parallel=True)``, so the blocks are pruned across the processes (gloo on CPU),
and saves the pruned weights, the sparsity record it ends with and how many blocks it pruned itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.engine import LayerwiseEngine

PRUNED_HERE: list[int] = []


def _count_pruned_blocks(prune_block):
    def counting(self, *args, **kwargs):
        PRUNED_HERE.append(1)
        return prune_block(self, *args, **kwargs)

    return counting


def main() -> None:
    checkpoint, output, config_json = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)  # two processes on two cores
    LayerwiseEngine.prune_block = _count_pruned_blocks(LayerwiseEngine.prune_block)
    options = json.loads(config_json)
    options["calibration"] = torch.load(checkpoint / "calibration_ids.pt")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, sparsity_config=hf_sparse.SparsityConfig(**options))
    rank = int(os.environ["RANK"])
    torch.save({"state": model.state_dict(), "record": model.config.sparsity_config,
                "blocks_pruned_here": len(PRUNED_HERE)}, output / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
