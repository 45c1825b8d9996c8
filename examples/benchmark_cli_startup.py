"""How long ``hf-sparse --help`` takes against importing torch and transformers, side by side.

    python examples/benchmark_cli_startup.py [--runs 7] [--threads 1]

Each run is a fresh interpreter; the two commands alternate (help, import, help, import, ...) so a machine that gets
busier or quieter during the measurement affects both alike. Prints the median wall time of each, the ratio, and
the spread (min-max). The command's goal: ``--help`` in at most half the time of ``import torch, transformers``,
because the command imports neither until a subcommand runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "hf-sparse --help": [sys.executable, "-m", "hf_sparse", "--help"],
    "hf-sparse prune --help": [sys.executable, "-m", "hf_sparse", "prune", "--help"],
    'python -c "import torch, transformers"': [sys.executable, "-c", "import torch, transformers"],
}


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the child processes (default 1)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for argv in COMMANDS.values():  # warm the file-system cache once, unmeasured
        time_once(argv, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            times[name].append(time_once(argv, env))
    reference = statistics.median(times['python -c "import torch, transformers"'])
    width = max(len(name) for name in COMMANDS)
    print(f"{'command':<{width}}  median s  min-max s    x import")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<{width}}  {median:8.3f}  {min(values):.3f}-{max(values):.3f}  {median / reference:8.3f}")
    print(f"\n{args.runs} runs each, alternating, fresh interpreters; Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, OMP/MKL threads {args.threads}")


if __name__ == "__main__":
    main()
