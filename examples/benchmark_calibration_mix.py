"""Which calibration to pick when the served text is mixed: calibrate on WikiText, on a second domain, or on a 50/50
mix, and evaluate each pruned model on both domains (plus magnitude pruning, which reads no data, as the baseline).

Calibration 32 windows of 256 tokens, seed 0; perplexity on the first ``--max-windows`` 256-token windows of each
evaluation text. The second domain is any public-domain book split in halves (first half calibrates, second half
evaluates), e.g. Grimm's fairy tales.

    python examples/benchmark_calibration_mix.py --second-calibration grimms-calib.txt --second-eval grimms-test.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_pruning import SHARED, table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "llama-7m-books")
    parser.add_argument("--second-calibration", type=Path, required=True)
    parser.add_argument("--second-eval", type=Path, required=True)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--max-windows", type=int, default=50)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparse

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    wiki_calibration = str(SHARED / "data" / "calibration.txt")
    evals = {"WikiText-2 test": (SHARED / "data" / "wikitext2-test.txt").read_text(encoding="utf-8"),
             args.second_eval.name: args.second_eval.read_text(encoding="utf-8")}
    calibrations = {"WikiText": dict(calibration=wiki_calibration),
                    args.second_calibration.name: dict(calibration=str(args.second_calibration)),
                    "50/50 mix": dict(calibration=[wiki_calibration, str(args.second_calibration)],
                                      calibration_weights=[1, 1])}
    runs = [("dense", None, {})] + [("magnitude", "none", {})]
    runs += [(m, name, cal) for m in args.methods.split(",") for name, cal in calibrations.items()]
    rows = []
    for method, calibration_name, calibration in runs:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        domain = None
        if method != "dense":
            cfg = hf_sparse.SparsityConfig(method=method, sparsity=args.sparsity, num_samples=32, sequence_length=256,
                                           seed=0, target_data=str(args.second_eval) if calibration else None,
                                           **calibration)
            record = hf_sparse.prune(model, cfg, tokenizer=tokenizer, show_progress=False)
            domain = record.domain_check
        ppl = [hf_sparse.evaluate.perplexity(model, tokenizer, text, sequence_length=256,
                                             max_windows=args.max_windows, show_progress=False)
               for text in evals.values()]
        result = {"method": method, "calibration": calibration_name, "perplexity": dict(zip(evals, ppl)),
                  "domain_check": domain}
        print("RUN", json.dumps(result), flush=True)
        overlap = f"{domain['token_overlap']:.2f}" if domain else ""
        rows.append([method, calibration_name or "", *(f"{p:.2f}" for p in ppl), overlap])
    print(f"\n{args.model.name}, {args.sparsity:.0%} unstructured; first {args.max_windows} windows of 256 tokens\n")
    print(table(["method", "calibration", *evals, f"token overlap calib vs {args.second_eval.name}"], rows))


if __name__ == "__main__":
    main()
