"""A process that is killed in the middle of an atomic save, for tests/test_saving.py.

    python crash_worker.py OUTPUT READY PHASE [PAUSE_SECONDS]

PHASE ``write``: writes a new checkpoint over OUTPUT with hf_sparse.saving.atomic_directory, creates READY halfway
through the files and pauses. PHASE ``swap``: pauses right after the old checkpoint was renamed away (between the two
renames of the swap). The test kills the process while it pauses. saving.py is loaded on its own (it needs nothing
but the standard library and hf_sparse.errors), so the process starts in a fraction of a second instead of importing
torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_saving():
    # An empty stand-in for the package, so `from .errors import shown` resolves without running hf_sparse/__init__.
    package = types.ModuleType("hf_sparse")
    package.__path__ = [str(REPO / "hf_sparse")]
    sys.modules["hf_sparse"] = package
    return importlib.import_module("hf_sparse.saving")


def main() -> None:
    output, ready, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 600.0
    saving = load_saving()
    if phase == "swap":
        rename = os.rename

        def pausing_rename(src, dst):
            rename(src, dst)
            if ".old-" in os.fspath(dst):
                ready.write_text("between the renames")
                time.sleep(pause)

        saving.os.rename = pausing_rename
    with saving.atomic_directory(output, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"run": "new"}')
        if phase == "write":
            ready.write_text(str(tmp))
            time.sleep(pause)
        (tmp / "model.safetensors").write_bytes(b"\0" * 4096)


if __name__ == "__main__":
    main()
