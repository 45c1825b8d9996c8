"""The README's quick start on a fresh clone: examples/quickstart.py with no ../shared, i.e. on the demo/ assets."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from conftest import REPO


def test_quickstart_runs_on_the_vendored_demo_assets(tmp_path):
    output = tmp_path / "pruned-demo"
    env = dict(os.environ, HF_SPARSE_SHARED=str(tmp_path / "no-shared-here"), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"), "--max-windows", "20", "--num-samples", "16",
         "--sequence-length", "128", "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "vendored demo assets" in out

    def number(label: str) -> float:
        return float(re.search(rf"^{label}\s+([0-9.]+|nan|inf)", out, re.MULTILINE).group(1))

    dense, pruned = number("dense perplexity"), number("pruned perplexity")
    # The demo model is a real pretrained LM: dense perplexity on WikiText-2 text is around 50, and 2:4 Wanda
    # pruning costs quality without destroying it.
    assert 30 < dense < 80
    assert math.isfinite(pruned) and dense < pruned < 2 * dense
    assert number("achieved sparsity") == 0.5
    record = json.loads((output / "config.json").read_text())["sparsity_config"]
    assert record["method"] == "wanda" and record["pattern"] == "2:4" and record["overall_sparsity"] == 0.5
    assert abs(record["evaluation"]["pruned_perplexity"] - pruned) < 0.006  # printed with 2 decimals
