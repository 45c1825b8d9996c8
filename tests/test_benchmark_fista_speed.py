"""``examples/benchmark_fista_speed.py``: its ``--method-option`` reaches the FISTA runs only, so the ratio column
compares a FISTA setting against SparseGPT's defaults, and the report names the setting."""

from __future__ import annotations

import pytest
import torch

from conftest import import_example


@pytest.fixture(scope="module")
def bench():
    return import_example("benchmark_fista_speed")

def test_method_options_go_to_fista_only(bench):
    args = bench.parse_args(["--method-option", "rounds=3", "--method-option", "precondition=false"])
    calibration = torch.zeros(2, 8, dtype=torch.long)
    fista = bench.sparsity_config("fista", args, calibration, torch.device("cpu"))
    baseline = bench.sparsity_config("sparsegpt", args, calibration, torch.device("cpu"))
    assert fista.method_options == {"rounds": 3, "precondition": False}
    assert baseline.method_options == {}


def test_a_bad_option_fails_before_any_model_is_built(bench):
    args = bench.parse_args(["--method-option", "rounds=0"])
    with pytest.raises(ValueError, match="rounds"):
        bench.sparsity_config("fista", args, torch.zeros(2, 8, dtype=torch.long), torch.device("cpu"))


def test_the_report_times_both_methods_and_names_the_fista_setting(bench, capsys, restore_threads):
    bench.main(["--preset", "tiny", "--blocks", "1", "--num-samples", "2", "--sequence-length", "32",
                "--hidden-size", "64", "--intermediate-size", "128", "--num-heads", "4", "--num-kv-heads", "2",
                "--threads", "1", "--method-option", "rounds=1"])
    report = capsys.readouterr().out
    assert "FISTA options: {'rounds': 1}." in report
    rows = [line for line in report.splitlines() if line.startswith(("| sparsegpt |", "| fista |"))]
    assert len(rows) == 2
    ratio = float(rows[1].split("|")[5])
    assert ratio > 0 and rows[0].split("|")[5].strip() == "1.00"
