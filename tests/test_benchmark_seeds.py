"""The seed-mean bookkeeping of ``examples/benchmark_pruning.py`` (its parity tables are means over calibration
seeds, assembled from runs that may have been made in separate processes through ``--cache``)."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import import_example


@pytest.fixture(scope="module")
def bench():
    return import_example("benchmark_pruning")

def test_spread_shows_mean_sample_sd_and_each_seed(bench):
    assert bench.spread([69.09, 71.29, 70.31]) == "70.23 ± 1.10 [69.09 / 71.29 / 70.31]"
    assert bench.spread([56.5]) == "56.50"
    assert bench.spread([]) == "-"


def test_seed_list_parses_and_names_the_bad_value(bench):
    assert bench.seed_list("0,1, 2") == [0, 1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="'0,x'"):
        bench.seed_list("0,x")
    with pytest.raises(argparse.ArgumentTypeError, match="at least one"):
        bench.seed_list(",")


def test_cached_run_is_read_back_and_the_thread_count_does_not_matter(bench, tmp_path, monkeypatch):
    calls = []

    def fake_worker(job):
        calls.append(job)
        return {"perplexity": 50.0 + job["seed"]}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    job = {"kind": "pretrained", "method": "wanda", "seed": 1, "threads": 1}
    assert bench.run_cached(job, tmp_path) == {"perplexity": 51.0}
    assert bench.run_cached(dict(job, threads=2), tmp_path) == {"perplexity": 51.0}  # read back, not rerun
    assert bench.run_cached(dict(job, seed=2), tmp_path) == {"perplexity": 52.0}  # another seed is another run
    assert len(calls) == 2
    stored = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert {s["job"]["seed"] for s in stored} == {1, 2} and all("threads" not in s["job"] for s in stored)
    assert not list(tmp_path.glob("*.tmp"))
