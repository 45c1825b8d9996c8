"""Which calibration to pick when the served text is mixed: calibrate on WikiText, on a second domain, or on a 50/50
mix, and evaluate each pruned model on both domains (plus magnitude pruning, which reads no data, as the baseline).

Calibration 32 windows of 256 tokens, seed 0; perplexity on the first ``--max-windows`` 256-token windows of each
evaluation text. The second domain is any public-domain book split in halves (first half calibrates, second half
evaluates): ``--book`` splits a Project Gutenberg plain-text file as ``examples/split_book.py`` describes (the README
uses Grimm's fairy tales, eBook #2591), or give the two halves yourself. First, the domain check's numbers for the
four calibration/target pairs on the dense model; then the pruned models.

    python examples/benchmark_calibration_mix.py --book pg2591.txt --methods wanda
    python examples/benchmark_calibration_mix.py --book pg2591.txt --domain-only    # the domain check only
    python examples/benchmark_calibration_mix.py --second-calibration first.txt --second-eval second.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_pruning import SHARED, table  # noqa: E402
from split_book import main as split_book  # noqa: E402

from hf_sparse.cli.common import add_threads_argument, apply_threads  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "llama-7m-books")
    parser.add_argument("--book", type=Path, default=None,
                        help="a Project Gutenberg plain-text file, split in halves (see examples/split_book.py)")
    parser.add_argument("--second-calibration", type=Path, default=None, help="the second domain's calibration half")
    parser.add_argument("--second-eval", type=Path, default=None, help="the second domain's evaluation half")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--max-windows", type=int, default=50)
    parser.add_argument("--domain-only", action="store_true",
                        help="only the domain check's table (dense model, no pruning: well under a minute on the 7M)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    if (args.book is None) == (args.second_calibration is None or args.second_eval is None):
        parser.error("give --book, or both --second-calibration and --second-eval")
    if args.book is not None:
        args.second_calibration, args.second_eval = split_book([str(args.book), "--output-dir", tempfile.mkdtemp()])

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
    # The domain check on the dense model, for every calibration/target pair.
    from hf_sparse.calibration import load_calibration
    from hf_sparse.calibration.domain import check_domain

    dense_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    domain_rows = []
    for calibration_name, calibration_path in (("WikiText", wiki_calibration),
                                               (args.second_calibration.name, str(args.second_calibration))):
        ids = load_calibration(calibration_path, tokenizer, 32, 256, 0)
        for target_name, target_path in (("WikiText-2 test", SHARED / "data" / "wikitext2-test.txt"),
                                         (args.second_eval.name, args.second_eval)):
            report = check_domain(dense_model, ids, str(target_path), tokenizer)
            print("DOMAIN", json.dumps({**report.to_dict(), "calibration": calibration_name, "target": target_name}),
                  flush=True)
            domain_rows.append([calibration_name, target_name,
                                f"{report.calibration_loss:.2f} / {report.target_loss:.2f}",
                                f"{report.token_overlap:.2f}", "yes" if report.mismatch else "no"])
    del dense_model
    domain_table = table(["calibration", "target", "dense loss calib / target (nats)", "token overlap", "warns"],
                         domain_rows)
    print(f"\ndomain check on the dense {args.model.name} (32 x 256 calibration windows, seed 0, vs up to 32 target "
          f"windows)\n\n{domain_table}")
    if args.domain_only:
        return

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
