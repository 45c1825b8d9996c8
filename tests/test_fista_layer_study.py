"""``examples/fista_layer_study.py``: the per-operator study behind the README's account of what FISTA's λ rounds
change (errors relative to the first setting, masks compared with the warm start's)."""

from __future__ import annotations

import argparse

import pytest

from conftest import import_example


@pytest.fixture(scope="module")
def study():
    return import_example("fista_layer_study")


def test_a_setting_is_a_name_and_a_json_object_of_valid_options(study):
    assert study.parse_setting('old={"rounds": 3, "precondition": false}') == ("old", {"rounds": 3,
                                                                                      "precondition": False})
    for bad in ("old", "old=[1]", "={}", "old={rounds: 3}"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=JSON-OBJECT"):
            study.parse_setting(bad)
    with pytest.raises(ValueError, match="rounds"):
        study.parse_setting('old={"rounds": 0}')


@pytest.mark.slow
def test_the_study_of_a_real_block_compares_settings_on_the_same_problems(study, capsys, restore_threads):
    study.main(["--model", "llama-7m-books", "--blocks", "1", "--num-samples", "8", "--sequence-length", "128",
                "--threads", "1", "--holdout-seed", "1", "--setting", "defaults={}", "--setting", "again={}",
                "--setting", 'no-refit={"refit_iterations": 0}', "--setting", 'ridge={"ridge": 0.1}'])
    out = capsys.readouterr().out
    assert "7 operators of blocks 1, 2:4" in out and "(held out: seed 1)" in out
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:8]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| setting")}
    assert list(rows) == ["defaults", "again", "no-refit", "ridge"]
    seconds = 3
    assert rows["defaults"][:seconds] + rows["defaults"][seconds + 1:] \
        == rows["again"][:seconds] + rows["again"][seconds + 1:]  # the same options solve the same problems alike
    assert rows["again"][1] == rows["again"][5] == "1.0000"
    assert float(rows["no-refit"][1]) > 1.0  # the refit only ever lowers the calibration error
    assert float(rows["ridge"][1]) > 1.0  # the ridge gives up some of the calibration fit
    for error, _, masks, _, held_out, _ in rows.values():
        low, mean = (float(value) for value in masks.split(" / "))
        assert 0.0 <= low <= mean <= 1.0
        # 1024 calibration tokens for 256-wide inputs: every setting fits its own windows better than others.
        assert float(error) < float(held_out)
